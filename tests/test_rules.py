"""Selection rules (`train.rule` positive / threshold) and self-references (`reference.mode` ema / checkpoint),
through `slm train` and `slm run` on the smoke out dir (tiny random Llama, byte tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import read_log, smoke_train
from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.method.loss import valid_mask
from selective_lm.store.blocks import BlockOrder
from selective_lm.store.frozen import model_token_losses
from selective_lm.store.layout import load_store
from selective_lm.training.models import apply_lora, load_model, load_tokenizer
from selective_lm.training.selfref import SelfReference

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(cfg: Any, weights: dict[str, torch.Tensor] | None = None) -> Any:
    """The run's LoRA model (the trainer's seeded init), with `weights` (a snapshot of the trainable ones) loaded."""
    torch.manual_seed(cfg.train.seed)
    model = apply_lora(load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))), cfg.model)
    if weights is not None:
        missing = set(weights) - set(model.state_dict())
        assert not missing, missing
        model.load_state_dict(weights, strict=False)
    return model.eval()


def _batch(out: Path, cfg: Any, step: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Rows, ids and valid mask of the one micro-batch of optimizer step `step` (0-based), as the trainer reads it."""
    store = load_store(out / "data" / "train")
    b = cfg.train.batch_size
    rows = BlockOrder(store.n_blocks, cfg.train.seed).blocks(step * b, b)
    ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
    return rows, ids, valid_mask(ids)


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(("rule", "threshold"), [("positive", 0.0), ("threshold", 0.3)])
def test_threshold_rules_train_exactly_the_tokens_scoring_above(smoke_out: Path, rule: str, threshold: float) -> None:
    extra = [f"train.threshold={threshold}"] if rule == "threshold" else []
    assert smoke_train(smoke_out, "train.method=topk", f"train.rule={rule}", *extra) == 0
    assert smoke_train(smoke_out, "train.method=random", f"train.rule={rule}", *extra) == 0
    name = "topk-pos" if rule == "positive" else f"topk-t{threshold:g}"
    cfg = load_config("smoke", overrides=["train.method=topk", f"train.rule={rule}", *extra])
    rows, ids, valid = _batch(smoke_out, cfg, 0)
    with torch.no_grad():
        own = model_token_losses(_student(cfg), ids, valid, 1024)
    ref = torch.from_numpy(np.load(smoke_out / "scores" / "train" / "ref_loss.npy")[rows])
    above = (valid & (own - ref > threshold)).numpy()
    assert 0 < above.sum() < valid.sum()  # the test means something: some tokens are in, some out
    sample = np.load(smoke_out / "runs" / name / "selection_sample.npz")
    assert np.array_equal(sample["rows"], rows)
    assert np.array_equal(sample["weights"] > 0, above)
    # The random control draws as many tokens (its first step starts from the same weights), not the same ones.
    control = "random-pos" if rule == "positive" else f"random-t{threshold:g}"
    rnd = np.load(smoke_out / "runs" / control / "selection_sample.npz")["weights"] > 0
    assert rnd.sum() == above.sum() and not np.array_equal(rnd, above)
    runs = smoke_out / "runs"
    assert read_log(runs / control)[0]["tokens_trained"] == read_log(runs / name)[0]["tokens_trained"]
    # The realised share: per step in the log, over the run in train.json.
    log = read_log(smoke_out / "runs" / name)
    assert log[0]["selected_frac"] == pytest.approx(above.sum() / valid.sum().item())
    summary = json.loads((smoke_out / "runs" / name / "train.json").read_text())
    n_valid = len(log) * cfg.train.batch_size * (cfg.data.block_len - 1)
    assert summary["selected_share"] == pytest.approx(log[-1]["tokens_trained"] / n_valid)
    assert (summary["rule"], summary["threshold"], summary["ratio"]) == (rule, threshold, None)


def test_export_keeps_the_tokens_above_the_threshold(smoke_out: Path) -> None:
    """`slm export-selected --format hf` of a positive-rule run: labels on exactly the final model's positive
    excess tokens (the export rescores each block with the run's final weights)."""
    import datasets

    from selective_lm.training.models import load_trained

    args = ["train.method=topk", "train.rule=positive", "train.steps=2"]
    assert smoke_train(smoke_out, *args) == 0
    assert main(["export-selected", "--preset", "smoke", "--out", str(smoke_out), "--format", "hf", *args]) == 0
    cfg = load_config("smoke", overrides=args)
    store = load_store(smoke_out / "data" / "train")
    labels = np.asarray(datasets.load_from_disk(str(smoke_out / "selected_hf"))["labels"])
    model = load_trained(cfg.model, smoke_out / "runs" / "topk-pos" / "adapter", len(load_tokenizer(cfg.model)))
    rows = np.arange(16)
    ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
    with torch.no_grad():
        own = model_token_losses(model.eval(), ids, valid_mask(ids), 1024)
    ref = torch.from_numpy(np.load(smoke_out / "scores" / "train" / "ref_loss.npy")[rows])
    positive = (own - ref > 0).numpy()  # NaN (position 0) compares False
    assert 0 < positive.sum() < positive.size
    assert np.array_equal(labels[rows] != -100, positive)


@pytest.mark.slow
def test_grid_rules_run_their_controls_and_reach_the_report(smoke_out: Path) -> None:
    overrides = ["grid.rules=[positive]", "grid.methods=[topk,random]", "grid.oracle=false", "eval.every=0",
                 "train.snapshot_every=0"]
    assert main(["run", "--preset", "smoke", "--out", str(smoke_out), *overrides]) == 0
    results = json.loads((smoke_out / "results.json").read_text())
    assert {"clm", "topk-pos", "random-pos"} <= set(results["runs"])
    for name in ("topk-pos", "random-pos"):
        run = results["runs"][name]
        assert run["rule"] == "positive" and 0 < run["selected_share"] < 1
    report = (smoke_out / "report.md").read_text()
    section = report.split("### `topk-pos`")[1].split("### ")[0]
    assert "| `random-pos`" in section and "There is no random-selection control" not in section


# ----------------------------------------------------------------------------- self-reference


def test_self_reference_swaps_in_place_and_follows_the_student() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = SelfReference({"w": w}, "ema", 0.75, 0)
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 6.0]))
    ema.after_step(1)
    expected = 0.75 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([5.0, 6.0])
    with ema.swapped_in():
        assert torch.equal(w.detach(), expected)
    assert torch.equal(w.detach(), torch.tensor([5.0, 6.0]))
    frozen = SelfReference({"w": w}, "checkpoint", 0.0, 2)
    for step, value in ((1, 7.0), (2, 8.0), (3, 9.0)):
        with torch.no_grad():
            w.fill_(value)
        frozen.after_step(step)
    assert torch.equal(frozen.state_dict()["w"], torch.tensor([8.0, 8.0]))  # the weights at step 2, kept
    restored = SelfReference({"w": w}, "checkpoint", 0.0, 2)
    restored.load_state_dict(frozen.state_dict())
    assert torch.equal(restored.state_dict()["w"], torch.tensor([8.0, 8.0]))


def test_checkpoint_reference_scores_with_the_frozen_weights(smoke_out: Path) -> None:
    """reference.mode=checkpoint: CLM until start_step, then excess against the weights of checkpoint_step."""
    args = ["train.method=topk", "train.ratio=0.5", "reference.mode=checkpoint", "reference.checkpoint_step=2",
            "reference.start_step=4", "train.name=ck"]
    # The stored scores must play no part: make them absurd (their fingerprints still match).
    ref_loss = smoke_out / "scores" / "train" / "ref_loss.npy"
    np.save(ref_loss, np.full_like(np.load(ref_loss), 100.0))
    assert smoke_train(smoke_out, *args) == 0
    log = read_log(smoke_out / "runs" / "ck")
    assert [r["selected_frac"] for r in log[:4]] == [1.0] * 4  # warm-up: every token
    assert all(r["selected_frac"] == pytest.approx(0.5, abs=0.01) for r in log[4:])
    trajectory = smoke_out / "runs" / "ck" / "checkpoints" / "trajectory"
    at = {s: load_file(trajectory / f"step-{s:06d}.safetensors") for s in (2, 4)}
    final_ref = load_file(smoke_out / "runs" / "ck" / "checkpoints" / "step-000006" / "reference.safetensors")
    assert set(final_ref) == set(at[2]) and all(torch.equal(final_ref[n], at[2][n]) for n in at[2])
    # Step 5 (index 4): own losses from the weights after step 4, reference losses from those after step 2.
    cfg = load_config("smoke", overrides=args)
    _, ids, valid = _batch(smoke_out, cfg, 4)
    with torch.no_grad():
        own = model_token_losses(_student(cfg, at[4]), ids, valid, 1024)
        ref = model_token_losses(_student(cfg, at[2]), ids, valid, 1024)
    excess = (own - ref)[valid]
    k = int(np.floor(0.5 * valid.sum().item() + 0.5))
    expected = excess.topk(k).values.mean().item()
    assert log[4]["score_selected"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_ema_reference_is_the_average_of_the_weights_and_resumes(smoke_out: Path, monkeypatch) -> None:
    from selective_lm.training.trainer import Trainer

    args = ["train.method=topk", "train.ratio=0.5", "reference.mode=ema", "reference.ema_decay=0.5",
            "reference.start_step=1", "train.snapshot_every=1", "train.score=retrospective"]
    assert smoke_train(smoke_out, *args, "train.name=straight") == 0
    trajectory = smoke_out / "runs" / "straight" / "checkpoints" / "trajectory"
    ema = load_file(trajectory / "step-000000.safetensors")
    for step in range(1, 7):
        w = load_file(trajectory / f"step-{step:06d}.safetensors")
        ema = {n: 0.5 * ema[n] + 0.5 * w[n] for n in ema}
    final_ref = load_file(smoke_out / "runs" / "straight" / "checkpoints" / "step-000006" / "reference.safetensors")
    for n in ema:
        torch.testing.assert_close(final_ref[n], ema[n], rtol=1e-5, atol=1e-7)
    # Interrupted in step 4 and resumed: the EMA comes back from checkpoint 3, the run is the same.
    step_fn = Trainer.step

    def interrupted(self: Trainer, step: int) -> dict[str, float]:
        if step == 3:
            raise KeyboardInterrupt
        return step_fn(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    assert smoke_train(smoke_out, *args, "train.name=resumed") == 130
    monkeypatch.setattr(Trainer, "step", step_fn)
    assert smoke_train(smoke_out, *args, "train.name=resumed") == 0
    assert read_log(smoke_out / "runs" / "resumed") == read_log(smoke_out / "runs" / "straight")


@pytest.mark.slow
def test_run_grid_with_a_self_reference_needs_no_reference_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = ["reference.mode=ema", "reference.start_step=2", "grid.methods=[topk,random]", "grid.ratios=[0.5]",
                 "eval.every=0", "train.snapshot_every=0"]
    assert main(["run", "--preset", "smoke", "--out", str(out), *overrides]) == 0
    assert not (out / "reference").exists() and not (out / "scores").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"clm", "oracle", "topk-r0.5-ema", "random-r0.5-ema", "base"}
    for name in ("topk-r0.5-ema", "random-r0.5-ema"):  # both warm up on every token: the control stays matched
        assert [r["selected_frac"] for r in read_log(out / "runs" / name)[:2]] == [1.0, 1.0]


def _bad(out: Path, capsys, command: str, *overrides: str) -> str:
    capsys.readouterr()
    assert main([command, "--preset", "smoke", "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slm: error:"), err
    return err


def test_bad_input_exits_2_with_one_line(smoke_out: Path, capsys, monkeypatch) -> None:
    assert "needs train.threshold" in _bad(smoke_out, capsys, "train", "train.method=topk", "train.rule=threshold")
    assert "train.score=none" in _bad(smoke_out, capsys, "train", "train.method=random", "train.rule=positive",
                                      "train.score=none")
    assert "train.soft" in _bad(smoke_out, capsys, "train", "train.method=topk", "train.rule=positive",
                                "train.soft=true")
    assert "start_step" in _bad(smoke_out, capsys, "train", "reference.mode=ema", "reference.start_step=6")
    assert "checkpoint_step" in _bad(smoke_out, capsys, "train", "reference.mode=checkpoint",
                                     "reference.checkpoint_step=3", "reference.start_step=3")
    assert "no reference model to make" in _bad(smoke_out, capsys, "reference", "reference.mode=ema",
                                                "reference.start_step=2")
    assert "online" in _bad(smoke_out, capsys, "score", "reference.mode=checkpoint", "reference.start_step=2")
    assert "no reference model to evaluate" in _bad(smoke_out, capsys, "eval", "train.name=reference",
                                                    "reference.mode=ema", "reference.start_step=2")
    # Full fine-tuning of a model whose copy would not fit: the memory it needs, in one line.
    monkeypatch.setattr("selective_lm.training.trainer.free_memory", lambda device: 1024)
    err = _bad(smoke_out, capsys, "train", "train.method=topk", "train.ratio=0.5", "reference.mode=ema",
               "reference.start_step=2", "model.lora=false")
    assert "GiB more" in err and "model.lora=true" in err
    assert not (smoke_out / "runs" / "topk-r0.5-ema").exists()
