"""One rank of test_selection's two-process `global` scope test (gloo, CPU).

Usage: python tests/helpers/dist_global_worker.py RANK WORLD_SIZE PORT OUT.pt. Rank r builds its own
micro-batch (rank 0: 3 rows x 12, rank 1: 2 rows x 9, so shapes differ), selects with
scope="global" under identically seeded generators, and saves its inputs and masks to OUT.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from selective_lm.method.selection import select

CASES = [  # (strategy, ratio, soft)
    ("topk", 0.3, False),
    ("random", 0.5, False),
    ("stochastic", 0.4, False),
    ("stochastic_positive", 0.5, False),
    ("topk", 0.5, True),
]


def main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    rows, width = (3, 12) if rank == 0 else (2, 9)
    scores = torch.randn(rows, width, generator=data)
    valid = torch.rand(rows, width, generator=data) < 0.8
    scores[~valid] = torch.nan  # as token_losses leaves them
    results = []
    for i, (strategy, ratio, soft) in enumerate(CASES):
        gen = torch.Generator().manual_seed(1234 + i)  # same seed on every rank
        results.append(select(scores, ratio, strategy, "global", valid, gen, soft=soft))
    torch.save({"scores": scores, "valid": valid, "results": results}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
