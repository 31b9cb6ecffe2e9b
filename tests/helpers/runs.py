"""A trained run's outputs as the tests compare two runs: the log, the weights, the first unit's selection.

Two runs that compute the same training in another order (micro-batch split, compiled layers, processes) are
compared with the bounds of `helpers.compare`; runs that compute it in the same order (a resume) bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from safetensors.torch import load_file

from helpers.compare import (
    GRAD_NORM_REL,
    LOSS_ATOL,
    SCORE_ATOL,
    assert_close,
    assert_same_updates,
    assert_selection_within_noise,
)
from selective_lm.cli import main
from selective_lm.config import Config
from selective_lm.method.registry import STRATEGIES
from selective_lm.method.selection import select
from selective_lm.store.frozen import model_token_losses
from selective_lm.store.layout import load_store
from selective_lm.training.models import load_model, load_reference_model, load_tokenizer

# The logged figures two orders of one training agree on, and their bounds: a mean loss as its tokens' losses, a
# gradient norm as its entries (helpers/compare.py), a mean of selected scores as the scores (two orders: twice
# SCORE_ATOL), a share of selected tokens exactly (the same count of the same valid tokens).
LOGGED = ("loss", "grad_norm", "selected_frac", "score_selected", "score_unselected")
LOG_BOUNDS: dict[str, dict[str, float]] = {
    "loss": {"abs": LOSS_ATOL}, "grad_norm": {"rel": GRAD_NORM_REL}, "selected_frac": {"abs": 1e-12},
    "score_selected": {"abs": 2 * SCORE_ATOL}, "score_unselected": {"abs": 2 * SCORE_ATOL},
    "selected_by_kind": {"abs": 1e-12}}


def smoke_train(out: Path, *overrides: str) -> int:
    """`slm train --preset smoke` in this process, on `out`: its exit code."""
    return main(["train", "--preset", "smoke", "--out", str(out), *overrides])


def kill_when_paused(cmd: list[str], env: dict[str, str], marker: Path, timeout: float) -> None:
    """Start `cmd` (helpers/train_proc.py, which writes `marker` and sleeps before a step), and once the marker is there
    SIGKILL it and its children (a launcher's workers run in sessions of their own): everything up to that step is
    on disk."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"{cmd} never paused"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone already when it failed on its own
            tree = psutil.Process(proc.pid)
            for process in [*tree.children(recursive=True), tree]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        proc.wait()


def read_log(run: Path, timings: bool = False) -> list[dict[str, Any]]:
    """log.jsonl, without its timings (`step_s`) unless asked: a resume or another engine logs other times."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return records if timings else [{k: v for k, v in r.items() if k != "step_s"} for r in records]


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trainable weights of the run's checkpoint at `step`."""
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


def trained(run: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of the run's last checkpoint."""
    return load_file(sorted((run / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors")


def start(run: Path) -> dict[str, torch.Tensor]:
    """The trainable weights before the first step (the trajectory's first snapshot: train.snapshot_every > 0)."""
    return load_file(run / "checkpoints" / "trajectory" / "step-000000.safetensors")


def assert_same_training(a: Path, b: Path, rel: float | None = None) -> None:
    """The same start, bit for bit, and the same updates by the same AdamW steps (`assert_same_updates`)."""
    s = start(a)
    assert set(s) == set(start(b)) and all(torch.equal(s[n], w) for n, w in start(b).items())
    lrs = [r["lr"] for r in read_log(a)]
    assert lrs == [r["lr"] for r in read_log(b)]
    assert_same_updates(trained(a), trained(b), s, lrs, **({} if rel is None else {"rel": rel}))


def selection_sample(run: Path) -> tuple[np.ndarray, torch.Tensor]:
    """The rows and the selection (a bool mask) of the run's first selection unit (step 0)."""
    with np.load(run / "selection_sample.npz") as z:
        return z["rows"], torch.from_numpy(z["weights"] > 0)


def float64_losses(model: Any, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A model's per-token losses in float64: the scores within `LOSS_ATOL` of every float32 order's."""
    return model_token_losses(copy.deepcopy(model).double(), ids, valid, chunk_size=ids.shape[1]).double()


def assert_same_first_selection(out: Path, cfg: Config, names: list[str],
                                generator: Callable[[], torch.Generator | None] = lambda: None) -> None:
    """Every run selected, in its first unit, what `cfg`'s rule selects from the float64 scores within
    `SCORE_ATOL`: the same tokens but for ties within the noise of scores computed in another order.

    The first step's student is the base model (LoRA's B starts at zero), its reference the stored scores' model.
    A selection that reads no score (every token, a warm-up, random draws) must be the same bit for bit.
    `generator` gives a fresh copy of the unit's generator (stochastic strategies draw from it).
    """
    samples = [selection_sample(out / "runs" / n) for n in names]
    rows, first = samples[0]
    assert all(np.array_equal(r, rows) for r, _ in samples), "the runs read other blocks"
    t = cfg.train
    rule = t.selection_rule()
    warmup = cfg.reference.is_self and cfg.reference.start_step > 0
    if warmup or rule.ratio >= 1 or not STRATEGIES[rule.strategy].uses_scores or not t.selection().method_entry.selects:
        assert all(torch.equal(mask, first) for _, mask in samples), "a selection that reads no score differs"
        return
    store = load_store(out / "data" / "train")
    ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
    valid = torch.from_numpy(store.targets(rows, cfg.data.doc_boundaries))
    own = float64_losses(load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))).eval(), ids, valid)
    ref = float64_losses(load_reference_model(cfg, out), ids, valid)
    scores = own - ref
    assert rule.score == "excess", rule  # the only kind these tests train
    for name, (_, mask) in zip(names, samples, strict=True):
        assert_selection_within_noise(
            mask, scores, SCORE_ATOL,
            lambda s: select(s, rule.ratio, rule.strategy, t.scope, valid, generator(), temperature=t.temperature,
                             soft=t.soft),
            what=name)


def assert_same_logs(la: list[dict[str, Any]], lb: list[dict[str, Any]], keys: Sequence[str] = LOGGED) -> None:
    """Two logs of one training computed in two orders: the same token counts, and each of `keys` within its
    bound (`LOG_BOUNDS`); scores are None in the steps that score nothing."""
    assert len(la) == len(lb) > 0
    for ra, rb in zip(la, lb, strict=True):
        counts = [k for k in ("step", "tokens_seen", "tokens_trained") if k in ra and k in rb]
        assert [ra[k] for k in counts] == [rb[k] for k in counts], (ra, rb)
        for key in keys:
            if key == "selected_by_kind":
                assert ra[key].keys() == rb[key].keys(), (ra["step"], ra[key], rb[key])
                for kind, share in ra[key].items():
                    assert_close(share, rb[key][kind], **LOG_BOUNDS[key], what=f"{key} {kind} step {ra['step']}")
            else:
                assert_close(ra[key], rb[key], **LOG_BOUNDS[key], what=f"{key} step {ra['step']}")


def assert_same_run(out: Path, a: str, b: str, cfg: Config,
                    generator: Callable[[], torch.Generator | None] = lambda: None) -> None:
    """Runs a and b of `out` are one training computed in two orders: the same logs (`assert_same_logs`), the same
    first selection and the same updates."""
    assert_same_logs(read_log(out / "runs" / a), read_log(out / "runs" / b), (*LOGGED, "selected_by_kind"))
    assert_same_first_selection(out, cfg, [a, b], generator)
    assert_same_training(out / "runs" / a, out / "runs" / b)


def assert_final_is_last_checkpoint(run: Path) -> None:
    """The exported adapter or model holds the last checkpoint's weights, bit for bit (the same tensors)."""
    adapter = run / "adapter" / "adapter_model.safetensors"
    final = load_file(adapter if adapter.is_file() else run / "model" / "model.safetensors")
    last = {n.replace(".default.", "."): w for n, w in trained(run).items()}
    assert set(final) <= set(last), sorted(set(final) - set(last))
    assert all(torch.equal(w, last[n]) for n, w in final.items())
