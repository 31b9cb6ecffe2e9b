"""`slm eval`: token-weighted perplexity against transformers' own loss, caching, trajectories, bad input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import private_copy
from selective_lm.cli import main
from selective_lm.evaluate import evaluate, evaluate_trajectory
from selective_lm.files import read_json
from selective_lm.store.layout import load_store
from selective_lm.training.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def _trained_template(_smoke_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke out dir with the `clm` run trained (6 steps, snapshots every 2), once per module."""
    from selective_lm.config import load_config
    from selective_lm.train import train

    out = tmp_path_factory.mktemp("eval-template") / "out"
    shutil.copytree(_smoke_template, out)
    train(load_config("smoke"), out)
    return out


@pytest.fixture
def trained_out(_trained_template: Path, tmp_path: Path) -> Path:
    return private_copy(_trained_template, tmp_path)


def base_model(cfg):
    return load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))).eval()


def hf_mean_loss(model: torch.nn.Module, tokens: np.ndarray) -> tuple[float, int]:
    """Token-weighted mean of transformers' own `labels=` loss over batches of blocks.

    HF averages a batch's B x (T - 1) predicted tokens; batches are combined weighted by that count.
    """
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), 16):
            ids = torch.from_numpy(np.asarray(tokens[start : start + 16], dtype=np.int64))
            n = ids.shape[0] * (ids.shape[1] - 1)
            nats += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    return nats / count, count


def test_eval_of_a_run_matches_transformers_labels_loss(smoke_cfg, trained_out: Path) -> None:
    from peft import PeftModel

    assert main(["eval", "--preset", "smoke", "--out", str(trained_out)]) == 0
    run = trained_out / "runs" / "clm"
    results = read_json(run / "eval.json")
    assert sorted(results) == sorted(smoke_cfg.eval.splits)
    model = PeftModel.from_pretrained(base_model(smoke_cfg), str(run / "adapter")).eval()  # unmerged
    for split in smoke_cfg.eval.splits:
        store = load_store(trained_out / "data" / split)
        losses = np.load(run / "token_losses" / f"{split}.npy")
        assert losses.shape == store.tokens.shape and losses.dtype == np.float32
        mean, count = hf_mean_loss(model, store.tokens)
        assert results[split]["tokens"] == count
        assert results[split]["loss"] == pytest.approx(mean, rel=1e-4)
        assert results[split]["ppl"] == pytest.approx(math.exp(mean), rel=1e-4)


@pytest.mark.slow
def test_a_run_loads_with_auto_peft_and_gives_its_eval_loss(trained_out: Path, tmp_path: Path, monkeypatch) -> None:
    """`AutoPeftModelForCausalLM.from_pretrained(run/adapter)` alone (adapter_config.json names the base: the smoke
    preset's `random:` model, saved once in $SLM_CACHE) gives `slm eval`'s loss; so does `train.merge`'s merged/."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SLM_CACHE", str(tmp_path / "cache"))
    for name in ("two-steps", "merged"):
        overrides = ("train.steps=2", f"train.name={name}", f"train.merge={name == 'merged'}")
        assert main(["train", "--preset", "smoke", "--out", str(trained_out), *overrides]) == 0
        assert main(["eval", "--preset", "smoke", "--out", str(trained_out), *overrides]) == 0
    store = load_store(trained_out / "data" / "val_clean")
    for name in ("two-steps", "merged"):
        run = trained_out / "runs" / name
        base = read_json(run / "adapter" / "adapter_config.json")["base_model_name_or_path"]
        assert Path(base).parent == tmp_path / "cache" / "models" and Path(base).name.startswith("random-tiny-llama-")
        loaded = {"adapter": AutoPeftModelForCausalLM.from_pretrained(str(run / "adapter"))}
        if name == "merged":
            loaded["merged"] = AutoModelForCausalLM.from_pretrained(str(run / "merged"))
        assert (run / "merged").is_dir() is (name == "merged")
        expected = read_json(run / "eval.json")["val_clean"]
        for what, model in loaded.items():
            mean, count = hf_mean_loss(model.eval(), store.tokens)
            assert count == expected["tokens"] and mean == pytest.approx(expected["loss"], rel=1e-4), (name, what)
    assert len(list((tmp_path / "cache" / "models").glob("random-*"))) == 1  # saved once, for both runs


def test_eval_of_reference_and_base(smoke_cfg, trained_out: Path) -> None:
    ref = evaluate(smoke_cfg, trained_out, "reference")
    base = evaluate(smoke_cfg, trained_out, "base")
    assert read_json(trained_out / "reference" / "eval.json") == ref
    assert read_json(trained_out / "base" / "eval.json") == base
    store = load_store(trained_out / "data" / "val_clean")
    mean, count = hf_mean_loss(base_model(smoke_cfg), store.tokens)
    assert base["val_clean"]["tokens"] == count and base["val_clean"]["loss"] == pytest.approx(mean, rel=1e-4)
    assert ref["val_clean"]["loss"] < base["val_clean"]["loss"]  # the reference trained on this kind of text
    assert (trained_out / "reference" / "token_losses" / "val_noisy.npy").is_file()


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is stored is read back without loading a model (a finished study's `slm run` loads none)."""
    from selective_lm import evaluate as module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for results already stored")

    for name in ("load_model", "load_trained", "load_reference_model"):
        monkeypatch.setattr(module, name, refuse)


def test_eval_reuses_token_losses_until_the_run_changes(smoke_cfg, trained_out: Path, monkeypatch) -> None:
    from selective_lm.train import train

    path = trained_out / "runs" / "clm" / "token_losses" / "val_clean.npy"
    first = evaluate(smoke_cfg, trained_out)
    others = {name: evaluate(smoke_cfg, trained_out, name) for name in ("reference", "base")}
    before = path.stat().st_mtime_ns
    with monkeypatch.context() as m:
        _no_model_loads(m)
        assert evaluate(smoke_cfg, trained_out) == first
        assert {name: evaluate(smoke_cfg, trained_out, name) for name in others} == others
    assert path.stat().st_mtime_ns == before

    retrained = smoke_cfg.model_copy(update={"train": smoke_cfg.train.model_copy(update={"lr": 3e-3})})
    train(retrained, trained_out, replace_stale=True)
    second = evaluate(retrained, trained_out)
    assert path.stat().st_mtime_ns != before and second["val_clean"]["loss"] != first["val_clean"]["loss"]

    bounded = retrained.model_copy(update={"data": retrained.data.model_copy(update={"doc_boundaries": True})})
    third = evaluate(bounded, trained_out)  # another validity mask: recomputed, fewer targets
    assert third["val_clean"]["tokens"] < second["val_clean"]["tokens"]

    limited = retrained.model_copy(update={"eval": retrained.eval.model_copy(update={"max_tokens": 1000})})
    fourth = evaluate(limited, trained_out)  # the first 16 blocks of 64 tokens: 1024 >= 1000
    assert np.load(path).shape == (16, 64) and fourth["val_clean"]["tokens"] == 16 * 63
    full = np.load(trained_out / "runs" / "clm" / "token_losses" / "val_noisy.npy")
    assert fourth["val_noisy"]["loss"] == pytest.approx(float(np.nanmean(full[:16])), rel=1e-5)


def test_trajectory_writes_one_file_per_snapshot_from_base_to_final(smoke_cfg, trained_out: Path, monkeypatch) -> None:
    steps = evaluate_trajectory(smoke_cfg, trained_out, "clm")
    assert steps == [0, 2, 4, 6]
    traj = trained_out / "runs" / "clm" / "token_losses" / "trajectory"
    assert sorted(p.name for p in traj.glob("*.npy")) == [f"step-{s:06d}.npy" for s in steps]
    evaluate(smoke_cfg, trained_out, "base")
    evaluate(smoke_cfg, trained_out)
    split = smoke_cfg.analysis.bucket_split
    base = np.load(trained_out / "base" / "token_losses" / f"{split}.npy")
    final = np.load(trained_out / "runs" / "clm" / "token_losses" / f"{split}.npy")
    np.testing.assert_allclose(np.load(traj / "step-000000.npy"), base, atol=1e-6, equal_nan=True)  # LoRA B = 0
    np.testing.assert_allclose(np.load(traj / "step-000006.npy"), final, atol=1e-5, equal_nan=True)
    before = (traj / "step-000002.npy").stat().st_mtime_ns
    with monkeypatch.context() as m:
        _no_model_loads(m)
        assert evaluate_trajectory(smoke_cfg, trained_out, "clm") == steps
    assert (traj / "step-000002.npy").stat().st_mtime_ns == before

    short = smoke_cfg.model_copy(update={"analysis": smoke_cfg.analysis.model_copy(update={"trajectory_tokens": 200})})
    evaluate_trajectory(short, trained_out, "clm")  # 4 blocks of 64 tokens, spread over the split's documents
    rows = load_store(trained_out / "data" / split).spread_blocks(200)
    assert np.load(traj / "step-000006.npy").shape == (4, 64) and len(rows) == 4
    np.testing.assert_allclose(np.load(traj / "step-000000.npy"), base[rows], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(np.load(traj / "step-000006.npy"), final[rows], atol=1e-5, equal_nan=True)


def test_eval_of_a_missing_or_unfinished_run_exits_2(trained_out: Path, tmp_path: Path, capsys) -> None:
    def eval_exit(out: Path, *overrides: str) -> str:
        assert main(["eval", "--preset", "smoke", "--out", str(out), *overrides]) == 2
        full = capsys.readouterr().err
        assert "Traceback" not in full
        return full.strip().splitlines()[-1]

    assert "has not finished training" in eval_exit(trained_out, "train.name=nope")
    (trained_out / "runs" / "clm" / "train.json").unlink()  # killed before the end: checkpoints only
    assert "has not finished training" in eval_exit(trained_out)
    assert "no token store" in eval_exit(tmp_path / "empty")
