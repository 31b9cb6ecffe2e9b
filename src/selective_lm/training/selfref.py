"""Self-reference (`reference.mode` ema or checkpoint): the student's own earlier weights score its tokens.

ssToken (2025) scores a token by how the student's loss compares with a *history* model's: an
exponential moving average of the student's weights, or a frozen earlier checkpoint, instead of a
reference trained on clean data. Here the history model is a copy of the student's trainable
weights (the LoRA adapter, or every weight in full fine-tuning), kept beside them:

- `ema`: after every optimizer step, copy <- decay x copy + (1 - decay) x weights, from the start
  weights on;
- `checkpoint`: the weights right after optimizer step `reference.checkpoint_step` (0: the start
  weights), frozen.

Scoring is online: for each micro-batch the copy is swapped into the parameters in place, the
engine runs a no-grad forward in eval mode (no dropout draws), and the weights are swapped back.
The swap goes one parameter at a time through a temporary of that parameter's size, so the extra
memory is the copy itself (`extra_bytes`). In place, the swap works on the local shards under
FSDP2 (each rank keeps the copy of its own shards) and on the replicas under DDP.

At step 0 the copy equals the student and every score would be 0, so selecting runs train every
token for the first `reference.start_step` steps (the trainer's business, not this module's).
Signs: with score kind `excess` (own - reference) the run selects what the student does worse than
its history; `retrospective` (reference - own) is ssToken's retrospective excess loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import UserError


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor that FSDP sharded (a DTensor), else the tensor."""
    return x.to_local() if hasattr(x, "to_local") else x


def extra_bytes(params: dict[str, torch.Tensor]) -> int:
    """The memory a self-reference adds on this rank: one copy of the (local) trainable weights."""
    return sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in params.values())


def check_fits(params: dict[str, torch.Tensor], mode: str, device: torch.device, free: int) -> None:
    """A self-reference copies the trainable weights: refuse one that would not fit in `free` bytes (full
    fine-tuning of a large model)."""
    need = extra_bytes(params)
    if need > 0.9 * free:
        raise UserError(f"reference.mode={mode} keeps a copy of the trainable weights: {need / 2**30:.2f} GiB more "
                        f"on {device}, where {free / 2**30:.2f} GiB are free; use model.lora=true, shard the model "
                        "(train.parallel=fsdp) or reference.mode=self")


class SelfReference:
    """A copy of the trainable weights that stands in for them while the reference scores."""

    def __init__(self, params: dict[str, torch.Tensor], mode: str, decay: float, checkpoint_step: int) -> None:
        self.params, self.mode, self.decay, self.checkpoint_step = params, mode, decay, checkpoint_step
        with torch.no_grad():
            self.copy = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """Follow the student after an optimizer step: the EMA update, or the checkpoint at `checkpoint_step`."""
        mine = [local_tensor(self.copy[n]) for n in self.params]
        theirs = [local_tensor(p.detach()) for p in self.params.values()]
        if self.mode == "ema":
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        elif steps_done == self.checkpoint_step:
            torch._foreach_copy_(mine, theirs)

    @torch.no_grad()
    def _swap(self) -> None:
        for name, p in self.params.items():
            weights, copy = local_tensor(p.detach()), local_tensor(self.copy[name])
            held = weights.clone()
            weights.copy_(copy)
            copy.copy_(held)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The reference's weights in the parameters for the duration of the block (then the student's again)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy in full on every rank (a collective under FSDP), on the CPU, keyed like the trainable weights."""
        return {n: (c.full_tensor() if hasattr(c, "full_tensor") else c).detach().cpu().contiguous()
                for n, c in self.copy.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`'s output (every rank keeps its own shards)."""
        for name, c in self.copy.items():
            full = state[name].to(device=c.device, dtype=c.dtype)
            if hasattr(c, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, c.device_mesh, c.placements)
            local_tensor(c).copy_(local_tensor(full))
