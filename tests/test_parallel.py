"""Data parallel: two processes (gloo; DDP and FSDP2, LoRA and full fine-tuning, compiled or not) train as one
process on the same global batch, and a killed FSDP run resumes under DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import private_copy
from helpers import testenv
from helpers.runs import (
    assert_final_is_last_checkpoint,
    assert_same_logs,
    assert_same_training,
    kill_when_paused,
    read_log,
    smoke_train,
)

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(*argv: str) -> list[str]:
    """`accelerate launch` of two CPU processes (gloo): `--cpu` with 2 processes would start only one."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *argv]


def _launch(out: Path, *args: str, script: tuple[str, ...] = (str(TESTS / "helpers" / "slm_proc.py"),)) -> list[str]:
    return _accelerate(*script, "train", "--preset", "smoke", "--out", str(out), *args)


DIST_ENV = {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(testenv.threads())}

# case -> (the two-process run's settings, the one-process run's own: the same global batch)
TOPK_GLOBAL = ("train.method=topk", "train.ratio=0.5", "train.scope=global")
FSDP_FULL = ("train.parallel=fsdp", "model.lora=false")
EMA = ("reference.mode=ema", "reference.start_step=2")
CHECKPOINT = ("reference.mode=checkpoint", "reference.checkpoint_step=1", "reference.start_step=2")
ONE = ("train.batch_size=4",)
TWO_PROCESS_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clm": (("train.method=clm",), ONE),
    "topk-global": (TOPK_GLOBAL, ONE),
    # Random draws follow the global batch position: the gathered batch draws as one process's batch,
    "random-global": (("train.method=random", "train.ratio=0.5", "train.scope=global"), ONE),
    "stochastic-global": (("train.method=stochastic", "train.ratio=0.3", "train.scope=global"), ONE),
    # and each rank's micro-batch draws as the same micro-batch of one process with accumulation.
    "random-batch": (("train.method=random", "train.ratio=0.5"), ("train.batch_size=2", "train.grad_accum=2")),
    # Accumulation: gradients are reduced once, at the step's last micro-batch (DDP's no_sync).
    "topk-accum": ((*TOPK_GLOBAL, "train.grad_accum=2"), (*ONE, "train.grad_accum=2")),
    # FSDP2 (gloo): LoRA, and full fine-tuning with a trainable head on the selected-rows path (ratio < 0.5).
    "fsdp-clm": (("train.method=clm", "train.parallel=fsdp"), ONE),
    "fsdp-topk-accum": ((*TOPK_GLOBAL, "train.parallel=fsdp", "train.grad_accum=2"), (*ONE, "train.grad_accum=2")),
    "fsdp-full-topk0.3": (("train.method=topk", "train.ratio=0.3", "train.scope=global", *FSDP_FULL),
                          (*ONE, "model.lora=false")),
    # A self-reference swaps its copy into the (sharded) weights: the EMA of LoRA under DDP; under FSDP the
    # root's weights too (full fine-tuning), which FSDP must gather anew after each swap.
    "ddp-ema": ((*TOPK_GLOBAL, *EMA), (*ONE, *EMA)),
    "fsdp-full-checkpoint": ((*TOPK_GLOBAL, *FSDP_FULL, *CHECKPOINT), (*ONE, "model.lora=false", *CHECKPOINT)),
    # Compiled decoder layers (CPU inductor) against one eager process: under DDP with the EMA swap; under FSDP2
    # with full fine-tuning, gradient checkpointing and the checkpoint swap (tests/test_compile.py: one process).
    "ddp-compile-ema": ((*TOPK_GLOBAL, "train.compile=true", *EMA), (*ONE, *EMA)),
    "fsdp-compile-full-checkpointing": (
        (*TOPK_GLOBAL, *FSDP_FULL, "train.compile=true", "train.gradient_checkpointing=true", *CHECKPOINT),
        (*ONE, "model.lora=false", *CHECKPOINT)),
}


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(smoke_out: Path, _smoke_template: Path, tmp_path: Path,
                                                            subtests) -> None:
    """Every case's two-process run in one launch (helpers/slm_proc.py --many: the processes start once), then each
    case's one-process run beside it, a subtest per case.

    The run's outputs, written by the main process from weights gathered over the ranks, are
    those of one process: the log, and the checkpoint's updates (helpers/compare.py); each run's final adapter or
    model is its last checkpoint. No compiled case may break its graph (a break would run part of a layer eager).
    Full fine-tuning has an out dir of its own (an out dir keeps the model settings it was made with).
    """
    full = private_copy(_smoke_template, tmp_path / "full")
    out = {case: full if "model.lora=false" in extra else smoke_out for case, (extra, _) in TWO_PROCESS_CASES.items()}
    commands = [["train", "--preset", "smoke", "--out", str(out[case]), *extra, f"train.name=ddp-{case}",
                 "train.batch_size=2"] for case, (extra, _) in TWO_PROCESS_CASES.items()]
    many = tmp_path / "commands.json"
    many.write_text(json.dumps(commands))
    done = subprocess.run(_accelerate(str(TESTS / "helpers" / "slm_proc.py"), "--many", str(many)),
                          env={**os.environ, **DIST_ENV, "TORCH_LOGS": "graph_breaks"}, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "__graph_breaks" not in done.stderr, done.stderr[-3000:]
    for case, (extra, single) in TWO_PROCESS_CASES.items():
        with subtests.test(case=case):
            assert smoke_train(out[case], *extra, f"train.name=single-{case}", *single) == 0
            ddp, one = out[case] / "runs" / f"ddp-{case}", out[case] / "runs" / f"single-{case}"
            assert len(read_log(ddp)) == len(read_log(one)) == 6  # rank 0 alone writes the log
            assert_same_logs(read_log(ddp), read_log(one))  # within float noise (helpers/runs.py): ranks sum otherwise
            assert_same_training(ddp, one)
            for run in (ddp, one):
                assert_final_is_last_checkpoint(run)


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_under_ddp(smoke_out: Path, tmp_path: Path) -> None:
    """Checkpoints hold the weights and optimizer gathered in full: a sharded run resumes with another engine."""
    args = ["train.method=topk", "train.ratio=0.5", "train.scope=global", "train.steps=8", "train.checkpoint_every=4",
            "train.batch_size=2", "train.name=killed"]
    marker = tmp_path / "paused"
    # Both ranks pause before step 6: checkpoint 4 is on disk.
    kill_when_paused(_launch(smoke_out, *args, "train.parallel=fsdp", script=(str(TESTS / "helpers" / "train_proc.py"),
                                                                            "6", str(marker))),
                     {**os.environ, **DIST_ENV}, marker, timeout=180)
    run = smoke_out / "runs" / "killed"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000004"]
    done = subprocess.run(_launch(smoke_out, *args, "train.parallel=ddp"), env={**os.environ, **DIST_ENV},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert smoke_train(smoke_out, *args[:-2], "train.batch_size=4", "train.name=straight") == 0
    resumed, straight = read_log(run), read_log(smoke_out / "runs" / "straight")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert_same_logs(resumed, straight, ("loss",))  # two engines, two processes against one: float noise
    assert_same_training(run, smoke_out / "runs" / "straight")
