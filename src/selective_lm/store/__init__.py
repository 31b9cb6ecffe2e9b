"""The one owner of the on-disk layout under `--out`: token and score stores, run dirs, the out dir's
config, and the frozen-model passes (reference, scoring, evaluation) that fill and read them."""
