"""Losses of a frozen model (reference, evaluated run, trajectory snapshot) over a token store.

`model_token_losses` scores one batch with the project's one next-token shift (`loss.token_losses`);
`token_loss_pass` runs it over a whole store into a `.npy` file, resumably, sharded over the
processes of `accelerate launch` when given their `Ranks`. Scoring, evaluation and online
scoring during training all use these two, so they can never disagree.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import atomic_path, read_json, write_json
from ..method.loss import forward_hidden, token_losses
from ..training.engine import check_launch, frozen_batch_size, to_device, uses_bf16
from .blocks import SCORE_STORAGE
from .layout import TokenStore

T = TypeVar("T")
# How long a rank waits for the others: the main process may evaluate and report alone, and a resumed rank
# may have a whole shard left, far longer than the default group's timeout (10 min under NCCL, 30 under gloo).
WAIT_TIMEOUT = timedelta(days=1)


class Ranks:
    """A process's place among the processes of `accelerate launch`; `Ranks()` is a process on its own.

    Waits and the few objects shared go through a gloo group of their own with `WAIT_TIMEOUT`, so
    that ranks idle while the main process works alone neither time out nor spin a GPU.
    """

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        self.world, self.rank, self._group = world, rank, group
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def launched(cls) -> Ranks:
        """This process's ranks: accelerate's `PartialState` reads the launcher's environment and starts
        the process group (gloo on CPU, like the trainer's `Accelerator`); one process without a launcher."""
        from accelerate import PartialState

        check_launch()
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes == 1:
            return cls()
        return cls(state.num_processes, state.process_index, state.device,
                   dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Barrier: return once every rank has called it."""
        if self._group is not None:
            dist.barrier(group=self._group)

    def share(self, obj: T) -> T:
        """The main process's `obj` on every rank (picklable objects)."""
        if self._group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def total(self, value: int) -> int:
        """The sum of `value` over the ranks."""
        if self._group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, group=self._group)
        return int(t.item())

    def on_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run by the main process alone while the others wait; every rank returns its result, or
        raises its bad-input error, so that all of them stop with the same one line (exit 2)."""
        result: Any = None
        error: str | None = None
        if self.main:
            try:
                result = fn()
            except (UserError, ValueError) as e:
                if self._group is None:
                    raise
                error = str(e)
        result, error = self.share((result, error))
        if error is not None:
            raise UserError(error)
        return result


@functools.cache
def ranks() -> Ranks:
    """`Ranks.launched()`, made once per process (every rank makes its gloo group at the same point)."""
    return Ranks.launched()


def encode_losses(losses: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 losses as a score store of `dtype` holds them: rounded to nearest (NaN stays NaN), bfloat16
    as its uint16 bit patterns (numpy has no bfloat16); `blocks.decode_scores` reads them back."""
    losses = losses.detach().cpu()
    if dtype == "bfloat16":
        return losses.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return losses.to(getattr(torch, dtype)).numpy()


def frozen_model(model: Any, device: torch.device, bf16: bool) -> Any:
    """A model that only scores, on `device`: eval mode, no grads, its weights in bf16 under bf16 precision
    (`engine.uses_bf16`: CUDA by default), so no pass casts float32 weights, and they take half the memory."""
    model = model.to(device).eval().requires_grad_(False)
    return model.to(torch.bfloat16) if bf16 else model


def pass_batch_size(model: Any, store: TokenStore, setting: int | str, chunk_size: int, n_rows: int,
                    device: torch.device) -> int:
    """`scoring.batch_size` / `eval.batch_size` for a pass over `store`: N, or auto (engine.frozen_batch_size)."""
    def probe(n: int) -> None:
        rows = slice(0, n)
        ids = to_device(store.tokens[rows], device, np.int64)
        model_token_losses(model, ids, to_device(store.targets(rows, False), device), chunk_size)

    key = {"kind": "frozen", "model": str(getattr(model.config, "_name_or_path", "")),
           "params": sum(p.numel() for p in model.parameters()), "block_len": store.tokens.shape[1]}
    return frozen_batch_size(setting, 8, probe, key, device, min(n_rows, store.n_blocks))


@torch.no_grad()
def model_token_losses(model: Any, ids: torch.Tensor, valid: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """float32 `[B, T]` losses of a frozen model (reference, evaluation), NaN where not valid.

    In the model's own dtype (`frozen_model`): the backbone in bf16 for a bf16 model, the head's
    logits upcast to float32 chunk by chunk (`loss.token_losses`) whatever it is.
    """
    hidden, head = forward_hidden(model, ids)
    return token_losses(hidden, head, ids, valid, chunk_size=chunk_size)


def _open_partial(partial: Path, shape: tuple[int, int], dtype: str, resume: bool,
                  fill: bool) -> tuple[np.ndarray, bool]:
    """The partial result memmap and whether it was reopened: reopened when resuming and intact, else
    created anew (NaN if `fill`)."""
    if resume:
        try:
            array = np.lib.format.open_memmap(partial, mode="r+")
            if array.shape == shape and array.dtype == SCORE_STORAGE[dtype]:
                return array, True
        except (OSError, ValueError):
            pass  # killed while it was being created: start over
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=SCORE_STORAGE[dtype], shape=shape)
    if fill:
        array[:] = encode_losses(torch.tensor(float("nan")), dtype)
    return array, False


def _progress_path(target: Path, rank: int, world: int) -> Path:
    """A rank's progress file; a single process keeps the name it always had."""
    return target.with_name(f".{target.stem}.progress{'' if world == 1 else f'.{rank}-of-{world}'}.json")


def _relaunch_hint(world: int) -> str:
    return "rerun it in one process (without accelerate launch)" if world == 1 else \
        f"relaunch with `accelerate launch --num_processes {world}`"


def token_loss_pass(model: Any, store: TokenStore, target: Path, expected: dict[str, Any], desc: str, *,
                    batch_size: int | str, chunk_size: int, doc_boundaries: bool = False, loss_mask: bool = False,
                    rows: np.ndarray | None = None, dtype: str = "float32", precision: str = "auto",
                    ranks: Ranks | None = None) -> float | None:
    """Per-token losses of every block of `store` into `target` (.npy `[n_blocks, T]`, NaN where no target).

    The losses are float32 and stored in `dtype` (see `encode_losses`); the model runs in bf16 when
    `precision` (`train.mixed_precision`: auto, bf16, no) says so (`engine.uses_bf16`).
    `doc_boundaries` also masks (NaN) targets whose previous token is in another document, and
    `loss_mask` the prompt tokens of a supervised fine-tuning store (`TokenStore.targets`): evaluation
    counts what training trains; scoring leaves both off, so one score store serves every mask.
    `rows` (sorted block indices) restricts the pass to those blocks; the others stay NaN.
    Resumable: rows go into a partial memmap, and after every batch a progress file records how
    many are done; a rerun with the same `expected` fingerprints and batch size continues there,
    in the same batches, so the result is bit-identical to an uninterrupted pass. Only a
    complete pass is renamed to `target`. Returns this call's tokens/s (None if nothing was left).

    `ranks` shards the pass over the launcher's processes, which must share the file system: the
    main process creates (or keeps) the partial memmap, then each rank scores a contiguous run of
    the single-process pass's batches into it, with a progress file of its own (world size, rank,
    fingerprints, batch size), so each resumes after a kill. A partial pass of another process
    count is refused, not discarded. The main process renames the result once every rank is done;
    the other ranks return None.

    No msync per batch: rows written to the shared memmap are in the page cache at once, so a
    killed process loses none (like every file of the project, nothing is fsynced against power
    loss), and a sync per batch would cost a disk round trip per batch on a fast GPU.
    """
    ranks = ranks or Ranks()
    world, rank = ranks.world, ranks.rank
    model = frozen_model(model, ranks.device, uses_bf16(precision, ranks.device))
    n_blocks, block_len = store.tokens.shape
    # Every rank must cut the same batches: the main process's size holds for all.
    batch_size = ranks.share(pass_batch_size(model, store, batch_size, chunk_size,
                                             n_blocks if rows is None else len(rows), ranks.device))
    partial = target.with_name(f".{target.stem}.partial.npy")
    key = {"expected": expected, "batch_size": batch_size}
    found = {p: read_json(p) for p in target.parent.glob(f".{target.stem}.progress*.json")}
    resumable = {p: r for p, r in found.items() if all(r.get(k) == v for k, v in key.items())}
    others = sorted({r.get("world", 1) for r in resumable.values()} - {world})
    if others and partial.is_file():
        raise UserError(f"{target.parent} holds a partial pass ({desc}) of {others[0]} process(es), this launch has "
                        f"{world}: {_relaunch_hint(others[0])}, or delete {target.parent}")
    ranks.wait()  # every rank has read the progress files before the main process may delete them
    if ranks.main:
        keep = partial.is_file() and any(r.get("world", 1) == world for r in resumable.values())
        array, kept = _open_partial(partial, (n_blocks, block_len), dtype, keep, fill=rows is not None)
        if not kept:
            for path in found:
                path.unlink(missing_ok=True)
    ranks.wait()
    if not ranks.main:
        array = np.lib.format.open_memmap(partial, mode="r+")
    progress_path = _progress_path(target, rank, world)
    progress = read_json(progress_path) if progress_path.is_file() else {}
    resume = all(progress.get(k) == v for k, v in key.items()) and progress.get("world", 1) == world
    done = int(progress.get("done_blocks", 0)) if resume else 0
    todo = np.arange(n_blocks) if rows is None else rows
    n_batches = -(-len(todo) // batch_size)  # whole batches per rank: the same batches as one process
    mine = todo[n_batches * rank // world * batch_size : n_batches * (rank + 1) // world * batch_size]
    start_t, start_done = time.perf_counter(), done
    with tqdm(total=len(mine) * block_len, initial=done * block_len, desc=desc, unit="tok", unit_scale=True,
              dynamic_ncols=True, disable=not ranks.main) as bar:
        while done < len(mine):
            batch = mine[done : done + batch_size]
            # One copy: the int32 memmap rows straight into the int64 ids the embedding needs.
            ids = to_device(store.tokens[batch], ranks.device, np.int64)
            valid = to_device(store.targets(batch, doc_boundaries, loss_mask), ranks.device)
            array[batch] = encode_losses(model_token_losses(model, ids, valid, chunk_size), dtype)
            done += len(batch)
            write_json(progress_path, {**key, "world": world, "rank": rank, "done_blocks": done})
            bar.update(len(batch) * block_len)
    del array
    ranks.wait()  # every shard is written
    seconds = time.perf_counter() - start_t
    tokens = ranks.total((done - start_done) * block_len)
    if not ranks.main:
        return None
    with atomic_path(target) as tmp:
        partial.replace(tmp)
    for path in target.parent.glob(f".{target.stem}.progress*.json"):
        path.unlink(missing_ok=True)
    return tokens / seconds if tokens and seconds > 0 else None
