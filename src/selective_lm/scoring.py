"""`slm score`: the reference's per-token losses over a split, once for every run of a grid.

`ref_loss[b, t]` is the reference loss of `tokens[b, t]` given `tokens[b, :t]` (NaN at t = 0),
computed by the same `loss.token_losses` as training, so the two can never disagree on the shift.

The store is written by `frozen.token_loss_pass`: incrementally, resumable after a kill, and
renamed to `ref_loss.npy` only when complete. `meta.json` holds the fingerprints of the token
store, tokenizer and reference model, and the storage dtype; `OutDir.scores` refuses any mismatch.

Sharded: under `accelerate launch --num_processes N -m selective_lm.cli score ...` every rank
scores a contiguous share of the batches into the one store (each resumes after a kill; a
partial store of another process count is refused, naming the count to relaunch with), and the
main process renames it and writes meta.json once all are done. One process: exactly as before.

`scoring.dtype` (float32, float16, bfloat16) is the storage dtype of `ref_loss.npy`; the losses are
computed in float32 and only rounded when stored. numpy has no bfloat16, so a bfloat16 store holds
the bit patterns as uint16 (`"dtype": "bfloat16"` in meta.json); read it with
`torch.from_numpy(np.load(path)).view(torch.bfloat16)` or `blocks.decode_scores`. Readers in this
package (`OutDir.scores`) always get float32 values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Config
from .errors import UserError
from .files import fingerprint, read_json, write_json
from .store.blocks import BlockOrder
from .store.frozen import ranks, token_loss_pass
from .store.layout import OutDir
from .training.models import load_reference_model, load_tokenizer, tokenizer_fingerprint


def score(cfg: Config, out: str | Path | OutDir, split: str = "train", model: Any = None) -> dict[str, Any] | None:
    """Write `out/scores/<split>/ref_loss.npy`; resumes a killed pass; no-op when already complete.

    Every position t >= 1 is scored, whatever `data.doc_boundaries`: that option only decides which
    positions training uses, so one score store serves both settings. Launched on several processes,
    the ranks score shards of it; only the main process returns the meta, once the store is complete.
    """
    if cfg.reference.is_self:
        raise UserError(f"reference.mode={cfg.reference.mode} is scored online during training, by the student's "
                        "own weights: there is no score store to make")
    out, team = OutDir.of(out), ranks()
    store = out.store(split)
    tokenizer = load_tokenizer(cfg.model)
    score_dir = out.scores_dir(split)
    rows = used_blocks(cfg, store.n_blocks, team.world) if cfg.scoring.blocks == "used" else None
    expected = {
        "token_store": store.fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "reference": out.reference_digest(),
        "blocks": "all" if rows is None else fingerprint(rows.tolist()),
        "dtype": cfg.scoring.dtype,
    }
    if expected["reference"] is None:
        raise UserError(f"no reference model in {out.reference.path}: run `slm reference --out {out}` first")
    if (score_dir / "meta.json").is_file() and (score_dir / "ref_loss.npy").is_file():
        meta = {"dtype": "float32", **read_json(score_dir / "meta.json")}  # stores older than scoring.dtype
        if all(meta.get(k) == v for k, v in expected.items()):
            return meta if team.main else None
    try:
        score_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write scores to {score_dir}: {e.strerror or e}") from None
    model = model if model is not None else load_reference_model(cfg, out)
    tokens_per_s = token_loss_pass(model, store, score_dir / "ref_loss.npy", expected, f"score {split}",
                                   batch_size=cfg.scoring.batch_size, chunk_size=cfg.scoring.chunk_size, rows=rows,
                                   dtype=cfg.scoring.dtype, precision=cfg.train.mixed_precision, ranks=team)
    meta = {**expected, "split": split, "n_blocks": store.n_blocks, "block_len": store.block_len,
            "reference_mode": cfg.reference.mode, "tokens_per_s": tokens_per_s, "created_by": __version__,
            "scored_blocks": store.n_blocks if rows is None else len(rows), "processes": team.world}
    if team.main:
        write_json(score_dir / "meta.json", meta)
    team.wait()  # no rank goes on (to train, in `slm run`) before the store is complete
    return meta if team.main else None


def used_blocks(cfg: Config, n_blocks: int, world: int = 1) -> np.ndarray:
    """Sorted blocks that the grid of `cfg` reads on `world` processes: every seed's first
    steps × batch × processes positions.

    With `scoring.blocks=used` only these are scored (the rest stay NaN): on a CPU, scoring a
    corpus much larger than a short study reads would cost more than the study. A trainer that
    reads other blocks (more steps, more processes) refuses the store.
    """
    t = cfg.train
    count = t.steps * t.batch_size * t.grad_accum * world
    seeds = range(t.seed, t.seed + cfg.grid.seeds)
    return np.unique(np.concatenate([BlockOrder(n_blocks, s).blocks(0, count) for s in seeds]))
