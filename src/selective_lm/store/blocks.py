"""The stores' block arrays apart from their paths: the training stream's order, the token store's growing
writer, and the half-precision score store read as float32.

layout.py owns where stores live and opens them; these are the array-level pieces it and the stages use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# scoring.dtype -> the numpy dtype of ref_loss.npy: numpy has no bfloat16, so its bit patterns are stored as uint16.
SCORE_STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


class BlockOrder:
    """The data order shared by every run of a comparison: epoch permutations seeded by `seed`.

    Position p of the training stream is block `perm_e[p % n_blocks]` with e = p // n_blocks;
    it depends on the store size and the seed only, so runs that differ in their loss mask
    read the same blocks in the same order, and scoring can know which blocks a grid reads.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks, self.seed = n_blocks, seed
        self._cache: dict[int, np.ndarray] = {}

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block indices at stream positions [start, start + count)."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n_blocks):
            perm = self._cache.get(int(epoch))
            if perm is None:
                perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_blocks)
                self._cache = {int(epoch): perm}
            sel = pos // self.n_blocks == epoch
            out[sel] = perm[pos[sel] % self.n_blocks]
        return out


class BlockFile:
    """A .npy file [rows, block_len] that grows row by row (the token store's writer).

    numpy pads .npy headers so that the first dimension can be rewritten in place: we write
    the header for 0 rows, append raw rows, and rewrite the header with the count at the end.
    """

    def __init__(self, path: Path, dtype: type, block_len: int) -> None:
        self.dtype, self.block_len, self.rows = np.dtype(dtype), block_len, 0
        self.f = open(path, "wb")  # closed by close(), also on failure
        self._header()
        self.header_len = self.f.tell()

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(self.f, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.rows, self.block_len)})

    def append(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def close(self, finished: bool) -> None:
        if finished:
            self.f.seek(0)
            self._header()
            assert self.f.tell() == self.header_len, "npy header changed size"
        self.f.close()


def decode_scores(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of stored scores: float16 widened, bfloat16 bit patterns moved into float32's high half
    (exact: bfloat16 is float32 with the low 16 mantissa bits dropped)."""
    if dtype == "bfloat16":
        return (np.asarray(raw, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


class HalfScores:
    """A float16 / bfloat16 score store that reads as float32: indexing converts only the rows it reads,
    so the trainer's `np.asarray(ref_loss[rows])` gets float32 without a float32 copy of the store."""

    def __init__(self, raw: np.ndarray, dtype: str) -> None:
        self.raw, self.stored = raw, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: Any) -> np.ndarray:
        return decode_scores(self.raw[index], self.stored)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = decode_scores(self.raw, self.stored)
        return values if dtype is None else values.astype(dtype)
