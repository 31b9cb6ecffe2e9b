"""Your own JSONL corpus through the whole study: prepare, reference, score, the grid, evaluation, report.

    python examples/own_corpus.py --train train.jsonl --reference reference.jsonl --val val.jsonl \
        --out out/mine [key=value ...]

Each line of the files holds {"text": "..."} (other fields: data.text_field=...). The reference split
is your high-quality text; the train split the noisier corpus that selection filters. Extra key=value
overrides go to `slm run` as they are (model.name=..., train.steps=200, grid.ratios=[0.6], ...);
the results land in OUT/results.json and OUT/report.md, and `slm export-selected --out OUT
train.method=topk train.ratio=0.5` writes the selected tokens afterwards.
"""

from __future__ import annotations

import argparse
import sys

from selective_lm.cli import main


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for split in ("train", "reference", "val"):
        parser.add_argument(f"--{split}", required=True, help=f"JSONL file of the {split} split")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default=None, help="preset to start from (default: champ-smollm2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    sources = f"{{train: '{args.train}', reference: '{args.reference}', val: '{args.val}'}}"
    command = ["run", *(["--preset", args.preset] if args.preset else []), "--out", args.out,
               "data.corpus=custom", f"data.sources={sources}", "eval.splits=[val]", "analysis.bucket_split=val",
               "data.noise_rate=0",
               *args.overrides]
    return main(command)


if __name__ == "__main__":
    sys.exit(run())
