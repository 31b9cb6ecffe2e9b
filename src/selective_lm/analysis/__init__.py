"""`slm analyze`'s numeric cores: pure functions, arrays/tensors in, numbers out.

- `buckets`: token-bucket transitions (H->H, H->L, L->H, L->L), the replication's quantile
  method and the paper's loss-trajectory method.
- `similarity`: weight updates (LoRA ΔW = scale · B @ A, or W_run − W_base) and their cosines.

Import the submodules directly (`from selective_lm.analysis.buckets import quantile_buckets`);
this package imports nothing so that loading one does not pull in the others.
"""
