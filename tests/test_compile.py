"""`train.compile=true` (every decoder layer under `torch.compile`, CPU inductor) trains the run eager trains.

Each combination the issue names is trained eager and compiled on the smoke model and compared
within float noise (compiled kernels sum in another order): LoRA, full fine-tuning, gradient
checkpointing, the online reference, both self-reference swaps and distillation here; DDP and
FSDP2 in tests/test_parallel.py's two-process tests. The last test counts compiles: none per step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.runs import assert_same_run
from selective_lm.config import load_config
from selective_lm.store.layout import OutDir
from selective_lm.train import train
from selective_lm.training.models import load_reference_model
from selective_lm.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SELECTING = ("train.method=topk", "train.ratio=0.5")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    SELECTING,
    (*SELECTING, "model.lora=false"),
    (*SELECTING, "train.gradient_checkpointing=true"),
    (*SELECTING, "model.lora=false", "train.gradient_checkpointing=true"),
    (*SELECTING, "scoring.mode=online"),
    (*SELECTING, "reference.mode=ema", "reference.start_step=1"),
    (*SELECTING, "model.lora=false", "reference.mode=checkpoint", "reference.checkpoint_step=1",
     "reference.start_step=2"),
    ("train.method=distill",),
], ids=["lora", "full", "checkpointing", "full-checkpointing", "online", "ema", "full-checkpoint-ref", "distill"])
def test_compiled_layers_equal_eager_on_cpu(smoke_out: Path, extra: tuple[str, ...]) -> None:
    """The same logs, first selection and updates within the float noise of another order of sums
    (helpers/runs.py); the compiled run compiled its layers whole (a graph break would run part of a layer eager,
    and equal eager trivially)."""
    from torch._dynamo.utils import counters

    common = (*extra, "train.steps=3", "eval.every=0")
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        cfg = load_config("smoke", overrides=[*common, f"train.compile={compile_}"])
        online = cfg.scoring.mode == "online"
        torch._dynamo.reset()  # each run compiles its own layers, as a fresh process does
        counters.clear()
        summary = train(cfg, smoke_out, name, reference_model=load_reference_model(cfg, smoke_out) if online else None)
        assert summary["engine"]["compiled_layers"] == (2 if compile_ == "true" else 0)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert_same_run(smoke_out, "eager", "compiled", cfg)


@pytest.mark.slow
def test_no_recompile_per_step(smoke_out: Path) -> None:
    """Compiles happen in the first steps and the first curve point, never again: not per step, not at an
    epoch's end, not after a self-reference pass or a curve point. The graphs stay within dynamo's
    recompile limit (past it a layer would silently run eager)."""
    from torch._dynamo.utils import counters

    cfg = load_config("smoke", overrides=[*SELECTING, "train.compile=true", "reference.mode=ema",
                                          "reference.start_step=1", "eval.batch_size=3"])
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(cfg, OutDir(smoke_out), OutDir(smoke_out).run("compiled"))
    trainer._size_micro_batches()
    trainer.model.train()
    trainer.step(0)  # warm-up (every token): the training graphs
    trainer.step(1)  # the self-reference's first pass: its eval-mode, no-grad graph
    trainer.curve.point(trainer.engine, trainer.module, trainer.model, 2, 0)  # 8 blocks per split: 3 + 3 + 2 rows
    graphs = counters["stats"]["unique_graphs"]
    # LoRA: layer 0's input needs no grad (frozen embeddings), the others' do (2); the swap's pass (1); the
    # curve's full and last, partial batch (2).
    assert graphs == 5 < torch._dynamo.config.recompile_limit
    per_epoch = trainer.store.tokens.shape[0] // cfg.train.batch_size
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in (2, 3, per_epoch - 1, per_epoch):  # an epoch's last full step, then one across two epochs
            trainer.step(step)
        trainer.curve.point(trainer.engine, trainer.module, trainer.model, 4, 0)
        trainer.step(4)
    assert counters["stats"]["unique_graphs"] == graphs
