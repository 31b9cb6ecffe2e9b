"""Losses of a frozen model (reference, evaluated run, trajectory snapshot) over a token store.

`model_token_losses` scores one batch with the project's one next-token shift (`loss.token_losses`);
`token_loss_pass` runs it over a whole store into a `.npy` file, resumably. Scoring, evaluation
and online scoring during training all use these two, so they can never disagree.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .files import atomic_path, read_json, write_json
from .layout import TokenStore
from .loss import forward_hidden, token_losses, valid_mask


@torch.no_grad()
def model_token_losses(model: Any, ids: torch.Tensor, valid: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """float32 `[B, T]` losses of a frozen model (reference, evaluation), NaN where not valid; bf16 on GPU."""
    dtype = torch.bfloat16 if ids.device.type == "cuda" else torch.float32
    with torch.autocast(ids.device.type, dtype=dtype, enabled=ids.device.type == "cuda"):
        hidden, head = forward_hidden(model, ids)
        return token_losses(hidden, head, ids, valid, chunk_size=chunk_size)


def _open_partial(partial: Path, shape: tuple[int, int], resume: bool, fill: bool) -> np.ndarray:
    """The partial result memmap: reopened when resuming and intact, else created anew (NaN if `fill`)."""
    if resume:
        try:
            array = np.lib.format.open_memmap(partial, mode="r+")
            if array.shape == shape and array.dtype == np.float32:
                return array
        except (OSError, ValueError):
            pass  # killed while it was being created: start over
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
    if fill:
        array[:] = np.nan
    return array


def token_loss_pass(model: Any, store: TokenStore, target: Path, expected: dict[str, Any], desc: str, *,
                    batch_size: int, chunk_size: int, doc_boundaries: bool = False,
                    rows: np.ndarray | None = None) -> float | None:
    """Per-token losses of every block of `store` into `target` (.npy float32 `[n_blocks, T]`, NaN where no target).

    `doc_boundaries` also masks (NaN) targets whose previous token is in another document.
    `rows` (sorted block indices) restricts the pass to those blocks; the others stay NaN.
    Resumable: rows go into a partial memmap, and after every batch a progress file records how
    many are done; a rerun with the same `expected` fingerprints and batch size continues there,
    in the same batches, so the result is bit-identical to an uninterrupted pass. Only a
    complete pass is renamed to `target`. Returns this call's tokens/s (None if nothing was left).

    No msync per batch: rows written to the shared memmap are in the page cache at once, so a
    killed process loses none (like every file of the project, nothing is fsynced against power
    loss), and a sync per batch would cost a disk round trip per batch on a fast GPU.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    n_blocks, block_len = store.tokens.shape
    partial = target.with_name(f".{target.stem}.partial.npy")
    progress_path = target.with_name(f".{target.stem}.progress.json")
    progress = read_json(progress_path) if progress_path.is_file() else {}
    resume = progress.get("expected") == expected and progress.get("batch_size") == batch_size
    array = _open_partial(partial, (n_blocks, block_len), resume and partial.is_file(), fill=rows is not None)
    todo = np.arange(n_blocks) if rows is None else rows
    done = int(progress.get("done_blocks", 0)) if resume else 0
    start_t, start_done = time.perf_counter(), done
    with tqdm(total=len(todo) * block_len, initial=done * block_len, desc=desc, unit="tok", unit_scale=True,
              dynamic_ncols=True) as bar:
        while done < len(todo):
            batch = todo[done : done + batch_size]
            # One copy: the int32 memmap rows straight into the int64 ids the embedding needs.
            ids = torch.from_numpy(np.asarray(store.tokens[batch], dtype=np.int64)).to(device)
            doc = torch.from_numpy(np.array(store.doc_ids[batch])).to(device) if doc_boundaries else None
            array[batch] = model_token_losses(model, ids, valid_mask(ids, doc_ids=doc), chunk_size).cpu().numpy()
            done += len(batch)
            write_json(progress_path, {"expected": expected, "batch_size": batch_size, "done_blocks": done})
            bar.update(len(batch) * block_len)
    seconds = time.perf_counter() - start_t
    del array
    with atomic_path(target) as tmp:
        partial.replace(tmp)
    progress_path.unlink(missing_ok=True)
    return (done - start_done) * block_len / seconds if done > start_done and seconds > 0 else None
