"""Resume: a run interrupted, killed, or stopped by a non-finite loss resumes from its last checkpoint bit for bit;
a checkpoint holds what that needs (weights, optimizer, scheduler, the CPU and CUDA RNG streams)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers.runs import (
    checkpoint_weights,
    kill_when_paused,
    read_log,
    smoke_train,
)
from selective_lm.config import load_config
from selective_lm.store.layout import OutDir
from selective_lm.training.checkpoint import trainable
from selective_lm.training.trainer import Trainer

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_and_resume_is_identical(smoke_out: Path, monkeypatch) -> None:
    """Ctrl-C in the middle of step 4 (after dropout drew from the RNG): exit 130, checkpoint 3."""
    args = ("train.method=topk", "train.ratio=0.5", "model.lora_dropout=0.1")
    assert smoke_train(smoke_out, *args, "train.name=straight") == 0
    step_fn = Trainer.step

    def interrupted(self: Trainer, step: int) -> dict[str, float]:
        if step == 3:
            torch.rand(100)  # what a partial forward's dropout draws
            raise KeyboardInterrupt
        return step_fn(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    args = (*args, "train.name=resumed")
    assert smoke_train(smoke_out, *args) == 130
    run = smoke_out / "runs" / "resumed"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000003"]
    assert len(read_log(run)) == 3 and not (run / "train.json").exists()
    monkeypatch.setattr(Trainer, "step", step_fn)
    assert smoke_train(smoke_out, *args) == 0
    straight = smoke_out / "runs" / "straight"
    assert read_log(run) == read_log(straight)
    w, s = checkpoint_weights(run, 6), checkpoint_weights(straight, 6)
    assert set(w) == set(s) and all(torch.equal(w[n], s[n]) for n in w)


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_identically(smoke_out: Path, tmp_path: Path) -> None:
    args = ["train.method=stochastic", "train.ratio=0.5", "train.steps=8", "train.checkpoint_every=4"]
    assert smoke_train(smoke_out, *args, "train.name=straight") == 0
    marker = tmp_path / "paused"
    kill_when_paused(  # it pauses before step 6: checkpoint 4 and log lines 5, 6 are on disk
        [sys.executable, str(TESTS / "helpers" / "train_proc.py"), "6", str(marker), "train", "--preset", "smoke",
         "--out", str(smoke_out), *args, "train.name=killed"],
        {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, marker, timeout=120)
    run = smoke_out / "runs" / "killed"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000004"]
    assert len(read_log(run)) == 6
    with open(run / "log.jsonl", "a") as f:  # a line the kill cut short
        f.write('{"step": 7, "tokens_')
    (run / "checkpoints" / ".step-000008.k2j4.tmp").mkdir()  # atomic writes the kill cut off
    (run / "checkpoints" / "trajectory" / ".step-000006.safetensors.x1.tmp").write_bytes(b"partial")
    assert smoke_train(smoke_out, *args, "train.name=killed") == 0
    assert not list(run.rglob("*.tmp"))
    straight = smoke_out / "runs" / "straight"
    assert read_log(run) == read_log(straight)
    w, s = checkpoint_weights(run, 8), checkpoint_weights(straight, 8)
    assert all(torch.equal(w[n], s[n]) for n in s)


@pytest.mark.parametrize("method", ["clm", "topk"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke_out: Path, capsys, monkeypatch,
                                                                  method: str) -> None:
    step_fn = Trainer.step

    def poisoned(self: Trainer, step: int) -> dict[str, float]:
        if step == 3:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "lora_A" in n).fill_(torch.nan)
        return step_fn(self, step)

    monkeypatch.setattr(Trainer, "step", poisoned)
    args = (f"train.method={method}", "train.ratio=0.5", "train.checkpoint_every=2")
    capsys.readouterr()
    assert smoke_train(smoke_out, *args) == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "not finite" in err and "Traceback" not in err
    run = next((smoke_out / "runs").iterdir())
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    assert all(torch.isfinite(v).all() for v in checkpoint_weights(run, 2).values())
    assert len(read_log(run)) == 3 and not (run / "train.json").exists()
    monkeypatch.setattr(Trainer, "step", step_fn)
    assert smoke_train(smoke_out, *args) == 0  # the kept checkpoint resumes
    assert len(read_log(run)) == 6


def test_checkpoints_hold_the_cuda_rng_state(monkeypatch) -> None:
    """Dropout on a GPU draws from the CUDA generator: a resume must restore it (faked here: no GPU in CI)."""
    from selective_lm.training import checkpoint

    state = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state)
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cpu"], torch.get_rng_state()) and torch.equal(saved["cuda"], state)


@pytest.mark.parametrize("lora", [True, False])
def test_checkpoint_weights_are_what_the_state_dict_api_gives(smoke_out: Path, lora: bool) -> None:
    """Whole weights (one process, DDP) are copied directly; the state-dict API, which FSDP2's shards need, gives the
    same names and values (a tied head once, as its embedding), and the copy does not move with training."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    cfg = load_config("smoke", overrides=[f"model.lora={str(lora).lower()}"])
    trainer = Trainer(cfg, OutDir(smoke_out), OutDir(smoke_out).run("clm"))
    weights = trainable(trainer.model)
    direct = trainer.checkpoints.trainable_state()
    api = get_model_state_dict(trainer.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          ignore_frozen_params=True))
    api = {k.removeprefix("model."): v for k, v in api.items() if k.removeprefix("model.") in weights}
    assert list(direct) == list(weights) and set(api) == set(direct)
    assert all(torch.equal(direct[k], api[k]) and direct[k].is_contiguous() for k in direct)
    with torch.no_grad():
        next(iter(weights.values())).add_(1.0)
    assert not torch.equal(next(iter(direct.values())), next(iter(weights.values())))
