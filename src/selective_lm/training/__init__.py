"""The one training loop and what it stands on: the trainer, the engine (processes, compile, autocast,
micro-batches), checkpoints, the self-reference, run statistics, learning curves and model loading.

Libraries of the `slm train` and `slm reference` stages: they import no stage."""
