"""Checks that need a CUDA device (`pytest -m gpu`; skipped without one): bf16, compile, RNG and scoring on a GPU.

Every other test runs on the CPU, on a GPU machine too (conftest.py), and the smoke preset pins
float32 and eager; these tests run on the GPU, turn its defaults back on and bound what they change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.runs import read_log, smoke_train
from selective_lm.cli import main
from selective_lm.training.trainer import Trainer

pytestmark = pytest.mark.gpu  # skipped without a CUDA device (conftest.py)


COMMON = ("train.method=topk", "train.ratio=0.5", "train.steps=4", "eval.every=0", "train.snapshot_every=0")


def test_bf16_training_agrees_with_float32(smoke_out: Path) -> None:
    """bf16 autocast changes the losses by rounding only (the tiny model's early losses agree to 2 %)."""
    assert smoke_train(smoke_out, *COMMON, "train.name=fp32") == 0
    assert smoke_train(smoke_out, *COMMON, "train.name=bf16", "train.mixed_precision=bf16") == 0
    for a, b in zip(read_log(smoke_out / "runs" / "fp32"), read_log(smoke_out / "runs" / "bf16"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a, b)


def test_compile_equals_eager_on_cuda(smoke_out: Path) -> None:
    assert smoke_train(smoke_out, *COMMON, "train.name=eager") == 0
    torch._dynamo.reset()
    assert smoke_train(smoke_out, *COMMON, "train.name=compiled", "train.compile=true") == 0
    for a, b in zip(read_log(smoke_out / "runs" / "eager"), read_log(smoke_out / "runs" / "compiled"), strict=True):
        assert a["tokens_trained"] == b["tokens_trained"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-3)


def test_interrupted_bf16_run_with_dropout_resumes_exactly_on_cuda(smoke_out: Path, monkeypatch) -> None:
    """Dropout draws from the CUDA generator: the checkpoint restores it, so the resumed log equals a straight run."""
    args = (*COMMON, "train.steps=6", "model.lora_dropout=0.1", "train.mixed_precision=bf16")
    assert smoke_train(smoke_out, *args, "train.name=straight") == 0
    step_fn = Trainer.step

    def interrupted(self: Trainer, step: int) -> dict[str, float]:
        if step == 3:
            torch.rand(100, device="cuda")  # what a partial forward's dropout draws
            raise KeyboardInterrupt
        return step_fn(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    assert smoke_train(smoke_out, *args, "train.name=resumed") == 130
    monkeypatch.setattr(Trainer, "step", step_fn)
    assert smoke_train(smoke_out, *args, "train.name=resumed") == 0
    assert read_log(smoke_out / "runs" / "straight") == read_log(smoke_out / "runs" / "resumed")


def test_bf16_scores_select_what_float32_scores_select(smoke_out: Path) -> None:
    """A bf16 reference pass keeps >= 97 % of the top half of each block that the float32 pass selects."""
    stores = {}
    for precision in ("no", "bf16"):
        out = smoke_out.parent / f"scores-{precision}"
        out.mkdir()
        for sub in ("data", "reference"):
            (out / sub).symlink_to(smoke_out / sub)
        assert main(["score", "--preset", "smoke", "--out", str(out), f"train.mixed_precision={precision}"]) == 0
        stores[precision] = np.load(out / "scores" / "train" / "ref_loss.npy")
    a, b = (np.nan_to_num(s[:, 1:], nan=-np.inf) for s in (stores["no"], stores["bf16"]))
    k = a.shape[1] // 2
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    kept = np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(top_a, top_b, strict=True)])
    assert kept >= 0.97, kept


def test_profile_counts_the_kernels_of_a_step_on_cuda() -> None:
    """`bench.profile`: the kernels a step launches and their share of its wall time."""
    from selective_lm.bench.steps import profile_step

    x = torch.randn(1024, 1024, device="cuda")
    prof = profile_step(lambda: (x @ x).relu_().sum(), torch.device("cuda"), step_s=1.0)
    assert prof["kernels"] >= 3 and prof["kernel_ms"] > 0 and 0 < prof["busy"] < 1
    assert prof["top_kernels"] and all(ms > 0 and calls >= 1 for _, ms, calls in prof["top_kernels"])
