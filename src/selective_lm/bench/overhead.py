"""Case overhead: what the trainer adds to a bare forward + backward + optimizer step, in time and host syncs.

The same model (the config's, LoRA as configured), the same micro-batches (`bench.overhead_accum`
per optimizer step, top-k 0.5 by the model's own loss, so no reference is needed): the trainer's
`_step` (reading the store, statistics, diagnostics, normalisation, clipping, schedule) against a
loop of `selective_lm_loss` + backward, then clip and AdamW, on micro-batches already on the
device. Timed round-robin like every step case, medians reported.

Host syncs are counted on any device, CPU included, in a separate untimed pass: reads of a tensor's
value on the host (`item`, `float()`/`bool()` of a tensor, `tolist`, `cpu`, `numpy`) and
data-dependent shapes (`nonzero`, `masked_select`, indexing by a boolean mask). On a GPU each one
stalls the host until the queue drains; on a CPU it costs nothing, which is why it is counted rather
than timed. The target is the trainer's syncs beyond the bare loop's per optimizer step: one (the
logged statistics) is the design, one more per micro-batch fails it. The bare loop's own count is
the model's: the loss path reads nothing on the host (`tests/test_loss.py`), transformers' causal
mask reads one value per forward (its check for packed sequences in the position ids).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import Config
from ..method.loss import selective_lm_loss
from ..method.spec import Selection
from ..prepare import prepare
from ..store.layout import OutDir
from ..training.trainer import Trainer

# Dispatcher ops that read a value on the host or size an output by the data.
_SYNC_OPS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default")
# Indexing ops, which sync when an index is a boolean mask (its nonzero runs inside the op, unseen by the mode).
_INDEX_OPS = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default")
_SYNC_METHODS = ("tolist", "cpu", "numpy")


def _mask_indexed(args: tuple[Any, ...]) -> bool:
    """Whether an indexing op's indices (its second argument) hold a boolean mask."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if name in _SYNC_OPS:
            self.counts[name] += 1
        elif name in _INDEX_OPS and _mask_indexed(args):
            self.counts[f"{name} (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs() -> Iterator[Counter[str]]:
    """Count the host syncs of the block (module docstring), by op or method name."""
    counter = _SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def counted(name: str) -> Callable[..., Any]:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return method

    try:
        for name in _SYNC_METHODS:
            setattr(torch.Tensor, name, counted(name))
        with counter:
            yield counter.counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def overhead(cfg: Config, out: OutDir) -> dict[str, Any]:
    """Trainer step / bare step (median seconds) and the trainer's extra host syncs per optimizer step."""
    b = cfg.bench
    accum = b.overhead_accum
    overrides = {"method": "topk", "score": "loss", "ratio": 0.5, "grad_accum": accum, "steps": 1 + 2 * b.steps,
                 "snapshot_every": 0, "checkpoint_every": 0, "micro_batch_size": cfg.train.batch_size,
                 "compile": False, "lr": 1e-4}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=overrides),
                                 "eval": cfg.eval.model_copy(update={"every": 0})}, deep=True)
    with tempfile.TemporaryDirectory(dir=out.root if out.root.is_dir() else None) as tmp:
        prepare(cfg, Path(tmp), splits=["train"])
        trainer = Trainer(cfg, OutDir.of(tmp), OutDir.of(tmp).run("overhead"))
        trainer.model.train()
        state = {"step": 0, "tokens_seen": 0, "tokens_trained": 0, "diag": {}}
        # The bare loop trains the trainer's own model on the trainer's micro-batches of the same step.
        batches = [[(mb.ids, mb.valid) for mb in trainer.micro_batches(s)] for s in range(cfg.train.steps)]
        opt = torch.optim.AdamW(trainer.weights, lr=1e-4)

        def bare(step: int) -> None:
            for ids, valid in batches[step]:
                with trainer.engine.autocast():
                    loss = selective_lm_loss(trainer.model, ids, valid, selection=Selection("topk", 0.5, "loss"))
                loss.loss_sum.backward()
            torch.nn.utils.clip_grad_norm_(trainer.weights, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def step(s: int) -> None:
            trainer.advance(state, trainer.step(s))

        def sync() -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()

        times: dict[str, list[float]] = {"trainer": [], "bare": []}
        for s in range(1, cfg.train.steps - 1):  # step 0 writes the run's selection sample: not a step's work
            for name, fn in (("trainer", step), ("bare", bare)):
                sync()
                start = time.perf_counter()
                fn(s)
                sync()
                if s > b.warmup:
                    times[name].append(time.perf_counter() - start)
        syncs = {}
        for name, fn in (("trainer", step), ("bare", bare)):
            with count_host_syncs() as counts:
                fn(cfg.train.steps - 1)
            syncs[name] = dict(counts)
    med = {name: statistics.median(t) for name, t in times.items()}
    n = {name: sum(c.values()) for name, c in syncs.items()}
    return {
        "model": cfg.model.name, "device": str(trainer.device), "batch_size": cfg.train.batch_size,
        "block_len": cfg.data.block_len, "micro_batches_per_step": accum,
        "trainer_step_s": med["trainer"], "bare_step_s": med["bare"], "step_vs_bare": med["trainer"] / med["bare"],
        "trainer_s_all": times["trainer"], "bare_s_all": times["bare"],
        "host_syncs": syncs, "extra_syncs_per_step": n["trainer"] - n["bare"],
    }


