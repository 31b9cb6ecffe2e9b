"""`slm train`: the real CLI on the smoke out dir (tiny random Llama, byte tokenizer).

What a run must guarantee: the logged loss is the true mean over the trained tokens of the
step, gradients are normalised by the selected count of the whole step (accumulation and
ranks included), only the trainable parameters move, every method reads the same blocks from
the same start, and bad input fails before anything is written. Resume: test_resume.py; two processes:
test_parallel.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers.compare import SCORE_ATOL, assert_selection_within_noise
from helpers.runs import (
    assert_same_first_selection,
    assert_same_logs,
    assert_same_training,
    checkpoint_weights,
    read_log,
    smoke_train,
)
from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.data.noise import KIND_IDS
from selective_lm.method.selection import select
from selective_lm.prepare import prepare
from selective_lm.store.blocks import BlockOrder
from selective_lm.store.layout import OutDir, load_store
from selective_lm.train import train
from selective_lm.training.models import load_model, load_tokenizer
from selective_lm.training.trainer import Trainer

LOG_KEYS = {"step", "tokens_seen", "tokens_trained", "loss", "lr", "selected_frac", "score_selected",
            "selected_by_kind", "kind_counts", "score_unselected", "grad_norm", "step_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a: float | None, b: float | None, rel: float) -> bool:
    # The floor: a mean of scores that nearly cancel (~1e-5 from terms ~1) differs by float noise only.
    return a == b or (a is not None and b is not None and abs(a - b) <= rel * max(abs(a), abs(b), 1e-2))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_topk_run_through_the_cli(smoke_out: Path, smoke_cfg) -> None:
    from peft import PeftModel

    assert smoke_train(smoke_out, "train.method=topk", "train.ratio=0.5", "train.steps=20") == 0
    run = smoke_out / "runs" / "topk-r0.5"
    log = read_log(run, timings=True)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert all(set(r) == LOG_KEYS for r in log)
    valid_per_step = smoke_cfg.train.batch_size * (smoke_cfg.data.block_len - 1)  # position 0 has no target
    for prev, r in zip([{"tokens_seen": 0, "tokens_trained": 0}, *log], log, strict=False):
        assert r["tokens_seen"] - prev["tokens_seen"] == smoke_cfg.train.batch_size * smoke_cfg.data.block_len
        assert abs(r["tokens_trained"] - prev["tokens_trained"] - 0.5 * valid_per_step) <= 0.01 * valid_per_step
        assert abs(r["selected_frac"] - 0.5) <= 0.01
        assert r["score_selected"] > r["score_unselected"]  # top-k by excess loss
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05  # it learns
    summary = json.loads((run / "train.json").read_text())
    assert summary["steps"] == 20 and summary["tokens_trained"] == log[-1]["tokens_trained"]
    assert summary["train_loss_final"] == log[-1]["loss"]

    base = load_model(smoke_cfg.model, vocab_size=len(load_tokenizer(smoke_cfg.model)))
    peft = PeftModel.from_pretrained(base, str(run / "adapter"))
    loaded = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    final = checkpoint_weights(run, 20)
    assert loaded and set(final) == set(loaded)
    assert all(torch.equal(loaded[n], final[n]) for n in final)


@pytest.mark.slow
def test_clm_run_selects_every_token_and_merges(smoke_out: Path, smoke_cfg) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert smoke_train(smoke_out, "train.method=clm", "train.steps=20", "train.merge=true") == 0
    run = smoke_out / "runs" / "clm"
    log = read_log(run)
    valid_per_step = smoke_cfg.train.batch_size * (smoke_cfg.data.block_len - 1)
    assert [r["tokens_trained"] for r in log] == [valid_per_step * (i + 1) for i in range(20)]
    assert all(r["selected_frac"] == 1.0 and r["score_unselected"] is None for r in log)
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05  # it learns

    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    base = load_model(smoke_cfg.model, vocab_size=len(load_tokenizer(smoke_cfg.model)))
    adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    ids = torch.from_numpy(np.asarray(load_store(smoke_out / "data" / "train").tokens[:2], dtype=np.int64))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    assert (run / "merged" / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_full_fine_tuning_writes_an_hf_model(smoke_out: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert smoke_train(smoke_out, "model.lora=false", "train.steps=2") == 0
    run = smoke_out / "runs" / "clm"
    assert not (run / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    final = checkpoint_weights(run, 2)
    params = dict(model.named_parameters())
    assert set(final) <= set(params) and len(final) == len(params)
    assert all(torch.equal(params[n], v) for n, v in final.items())


# ----------------------------------------------------------------------------- the loss and its gradient


def _naive_token_losses(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` CE of ids[:, t] from logits[:, t - 1] with plain F.cross_entropy; NaN at t = 0."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.cat([torch.full((ids.shape[0], 1), torch.nan), ce], dim=1)


@pytest.mark.parametrize("method", ["topk", "oracle"])
def test_logged_loss_is_the_true_mean_over_the_step(smoke_out: Path, smoke_cfg, method: str) -> None:
    """grad_accum=2: recompute step 1 from the same blocks and selection (LoRA B starts at 0, so the
    model at step 1 is the base model) and divide by the selected count of the whole step."""
    store = load_store(smoke_out / "data" / "train")
    clean = ~np.asarray(store.noise_mask)
    clean[:, 0] = False

    def clean_counts(seed: int) -> list[int]:
        order = BlockOrder(store.n_blocks, seed)
        return [int(clean[np.sort(order.blocks(2 * m, 2))].sum()) for m in range(2)]

    # A seed whose two micro-batches hold different numbers of clean tokens, so that the oracle's
    # selected counts differ and a mean of micro-batch means would show.
    seed = next(s for s in range(50) if len(set(clean_counts(s))) == 2)
    assert smoke_train(smoke_out, f"train.method={method}", "train.ratio=0.5", "train.batch_size=2",
                  "train.grad_accum=2", "train.steps=1", f"train.seed={seed}") == 0
    run = next((smoke_out / "runs").iterdir())
    logged = read_log(run)[0]
    ref = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")
    base = load_model(smoke_cfg.model, vocab_size=len(load_tokenizer(smoke_cfg.model))).eval()
    order = BlockOrder(store.n_blocks, seed)
    sums, counts = [], []
    for m in range(2):
        rows = np.sort(order.blocks(2 * m, 2))
        ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
        own = _naive_token_losses(base, ids)
        valid = ~torch.isnan(own)
        if method == "oracle":
            chosen = valid & ~torch.from_numpy(np.asarray(store.noise_mask[rows]))
        else:
            excess = (own - torch.from_numpy(ref[rows])).masked_fill(~valid, torch.nan).flatten()
            k = int(np.floor(0.5 * int(valid.sum()) + 0.5))
            chosen = torch.zeros(excess.numel(), dtype=torch.bool)
            chosen[excess.nan_to_num(-torch.inf).topk(k).indices] = True
            chosen = chosen.view_as(own)
        if m == 0:
            sample = np.load(run / "selection_sample.npz")
            assert np.array_equal(sample["rows"], rows)
            if method == "oracle":  # no score: the same tokens
                assert np.array_equal(sample["weights"] > 0, chosen.numpy())
            else:  # our scores and these naive ones: two float32 orders of the own loss, the same stored ref
                assert_selection_within_noise(torch.from_numpy(sample["weights"] > 0), excess.view_as(own), SCORE_ATOL,
                                              lambda s, v=valid: select(s, 0.5, "topk", "batch", v))
        sums.append(float(own[chosen].double().sum()))
        counts.append(int(chosen.sum()))
    assert logged["tokens_trained"] == sum(counts)
    assert logged["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    if method == "oracle":  # unequal counts per micro-batch: the mean of the micro-batch means would differ
        assert counts[0] != counts[1]
        assert logged["loss"] != pytest.approx((sums[0] / counts[0] + sums[1] / counts[1]) / 2, rel=1e-5)


@pytest.mark.parametrize("method", ["clm", "oracle"])
def test_accumulation_normalises_by_the_tokens_of_the_whole_step(smoke_out: Path, method: str) -> None:
    """batch 4 x accumulation 1 and batch 2 x accumulation 2 read the same blocks: same loss, same
    gradient norm (Adam would hide a mis-scaled gradient; the logged pre-clip norm does not), same updates."""
    assert smoke_train(smoke_out, f"train.method={method}", "train.name=a1", "train.steps=3") == 0
    assert smoke_train(smoke_out, f"train.method={method}", "train.name=a2", "train.steps=3", "train.batch_size=2",
                  "train.grad_accum=2") == 0
    a1, a2 = smoke_out / "runs" / "a1", smoke_out / "runs" / "a2"
    assert_same_logs(read_log(a1), read_log(a2), ("loss", "grad_norm"))  # within float noise (helpers/runs.py)
    assert_same_training(a1, a2)


# ----------------------------------------------------------------------------- what training changes


@pytest.mark.parametrize("lora", [True, False])
def test_training_changes_only_the_trainable_parameters(smoke_out: Path, lora: bool) -> None:
    cfg = load_config("smoke", overrides=[f"model.lora={str(lora).lower()}", "train.steps=3",
                                          "train.snapshot_every=0"])
    trainer = Trainer(cfg, OutDir(smoke_out), OutDir(smoke_out).run("clm"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if lora:
        assert changed == {n for n in before if "lora_" in n}  # B from step 1, A from step 2 on
        assert all("lora_" in n for n, p in after.items() if p.requires_grad)
    else:
        assert changed == set(before)


@pytest.mark.slow
def test_runs_of_different_methods_are_compute_matched(smoke_out: Path) -> None:
    """Same blocks in the same order, same start weights (the LoRA init does not depend on the
    process's RNG), same number of tokens fed."""
    for method in ("clm", "topk", "random"):
        assert smoke_train(smoke_out, f"train.method={method}", "train.ratio=0.3", "train.steps=2") == 0
        torch.manual_seed(len(method))  # whatever a process drew before must not change the start
    runs = [smoke_out / "runs" / n for n in ("clm", "topk-r0.3", "random-r0.3")]
    samples = [np.load(r / "selection_sample.npz") for r in runs]
    starts = [load_file(r / "checkpoints" / "trajectory" / "step-000000.safetensors") for r in runs]
    for s, w in zip(samples[1:], starts[1:], strict=True):
        assert np.array_equal(s["rows"], samples[0]["rows"]) and np.array_equal(s["tokens"], samples[0]["tokens"])
        assert all(torch.equal(w[n], starts[0][n]) for n in starts[0])
    assert len({tuple(r["tokens_seen"] for r in read_log(run)) for run in runs}) == 1
    assert samples[1]["weights"].sum() == samples[2]["weights"].sum() < samples[0]["weights"].sum()


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "train.json").read_text())


def test_distill_logs_its_ce_and_with_weight_zero_is_clm(smoke_out: Path) -> None:
    """Distillation trains every token; its logged loss is the CE (at step 1 the student is the base model, as
    CLM's), the KL moves the weights; with objectives.distill.weight=0 it is CLM."""
    for extra in (("train.method=clm",), ("train.method=distill",),
                  ("train.method=distill", "objectives.distill.weight=0")):
        assert smoke_train(smoke_out, *extra, "train.steps=2") == 0
    runs = smoke_out / "runs"
    clm, distill, zero = (read_log(runs / n) for n in ("clm", "distill", "distill-w0"))
    assert distill[0]["loss"] == pytest.approx(clm[0]["loss"], rel=1e-5)
    assert [r["tokens_trained"] for r in distill] == [r["tokens_trained"] for r in clm]
    assert _summary(runs / "distill")["method"] == "distill" and _summary(runs / "distill")["selected_share"] == 1
    with pytest.raises(AssertionError, match="updates differ"):  # the KL moves the weights elsewhere
        assert_same_training(runs / "distill", runs / "clm")
    assert_same_training(runs / "distill-w0", runs / "clm")  # CE through distill's chunks vs CLM's fused head
    assert [r["loss"] for r in zero] == pytest.approx([r["loss"] for r in clm], rel=1e-4)


def test_oracle_trained_share_is_trained_over_every_target(smoke_out: Path, smoke_cfg) -> None:
    """The oracle trains every target but the injected noise: its share is below 1 (it read 1.000 before)."""
    assert smoke_train(smoke_out, "train.method=oracle", "train.steps=2") == 0
    summary = _summary(smoke_out / "runs" / "oracle")
    targets = 2 * smoke_cfg.train.batch_size * (smoke_cfg.data.block_len - 1)
    assert summary["selected_share"] == pytest.approx(summary["tokens_trained"] / targets)
    assert 0.5 < summary["selected_share"] < 1
    log = read_log(smoke_out / "runs" / "oracle")
    assert min(r["selected_frac"] for r in log) < 1 and max(r["selected_frac"] for r in log) <= 1


def test_kind_and_document_counts_add_up(smoke_out: Path) -> None:
    """The per-step kind counts of log.jsonl sum to the run's, and the per-document counts of the wrong-step
    labels (CHAMP's annotated solutions) sum to those kinds' totals."""
    store = load_store(smoke_out / "data" / "train")
    labelled = np.isin(np.asarray(store.noise_kind), [KIND_IDS["after_wrong_step"], KIND_IDS["before_wrong_step"]])
    seed = next(s for s in range(100) if labelled[BlockOrder(store.n_blocks, s).blocks(0, 16)].any(1).sum() >= 3)
    assert smoke_train(smoke_out, "train.method=topk", "train.ratio=0.5", "train.steps=4", f"train.seed={seed}") == 0
    run = smoke_out / "runs" / "topk-r0.5"
    sel = _summary(run)["selection"]
    log = read_log(run)
    for kind, total in sel["kind_tokens"].items():
        assert sum(r["kind_counts"].get(kind, [0, 0])[1] for r in log) == total
        trained = sum(r["kind_counts"].get(kind, [0, 0])[0] for r in log)
        assert trained == pytest.approx(sel["by_kind"][kind] * total)
    docs = sel["wrong_step_docs"]
    assert set(docs["doc_ids"]) <= set(store.wrong_step_docs) and docs["doc_ids"]
    for kind in ("after_wrong_step", "before_wrong_step"):
        assert sum(docs[f"{kind}_valid"]) == sel["kind_tokens"].get(kind, 0)
        assert sum(docs[f"{kind}_selected"]) == pytest.approx(sel["by_kind"][kind] * sel["kind_tokens"][kind])


# ----------------------------------------------------------------------------- bad input


def _expect_bad_input(out: Path, capsys, *overrides: str, match: str) -> None:
    runs_before = sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []
    capsys.readouterr()
    assert smoke_train(out, *overrides) == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("slm:") or "Traceback" in ln]
    assert len(lines) == 1 and lines[0].startswith("slm: error:") and match in lines[0], err
    assert (sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []) == runs_before


@pytest.mark.parametrize(("overrides", "match"), [
    (("train.ratio=1.5",), "train.ratio"),
    (("train.ratio=0",), "train.ratio"),
    (("model.lora_targets=[c_attn]",), "c_attn"),
    (("train.method=topk", "train.ratio=0.5", "train.score=none"), "train.score=none"),
    (("train.method=topk", "train.ratio=0.5", "scoring.mode=online"), "scoring.mode=online"),
    (("train.parallel=fsdp", "train.merge=true"), "train.parallel=ddp"),
    (("train.method=distill", "objectives.distill.weight=-1"), "invalid value for objectives.distill.weight"),
    (("train.method=distill", "reference.mode=ema"), "reference.mode=ema is the student's own weights"),
    (("train.method=bottomk", "train.rule=positive"), "bottomk (the lowest scores) takes a ratio"),
    (("train.method=topk", "train.ratio=0.5", "objectives.distill.weight=2"),
     "objectives.distill.weight=2.0 has no effect"),
    (("train.method=topk", "train.ratio=0.5", "objectives.distill.weight=1"),  # its default: not in the dump
     "objectives.distill.weight=1 has no effect"),
])
def test_bad_config_fails_before_writing(smoke_out: Path, capsys, overrides: tuple[str, ...], match: str) -> None:
    _expect_bad_input(smoke_out, capsys, *overrides, match=match)


def test_missing_or_foreign_scores_are_refused(smoke_out: Path, capsys) -> None:
    meta_path = smoke_out / "scores" / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "token_store": "0123456789abcdef"}))
    _expect_bad_input(smoke_out, capsys, "train.method=topk", "train.ratio=0.5", match="another token store")
    shutil.rmtree(smoke_out / "scores")
    _expect_bad_input(smoke_out, capsys, "train.method=topk", "train.ratio=0.5", match="has none")


def test_model_whose_embeddings_do_not_fit_the_tokenizer(smoke_out: Path, tmp_path: Path, capsys) -> None:
    """A local model with its own, smaller vocabulary, trained on a store of the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(small)
    _expect_bad_input(smoke_out, capsys, f"model.name={small}", "model.tokenizer=random:tiny-llama",
                      match="embeddings only 100")


@pytest.mark.slow
def test_store_the_model_cannot_use(tmp_path: Path, capsys) -> None:
    """block_len beyond the model's positions (1024), and the oracle on a store without a noise mask."""
    out = tmp_path / "long"
    cfg = load_config("smoke", overrides=["data.block_len=2048", "data.noise_rate=0", "data.max_tokens=8192"])
    prepare(cfg, out, splits=["train"])
    assert load_store(out / "data" / "train").noise_mask is None
    data = ("data.block_len=2048", "data.noise_rate=0", "data.max_tokens=8192")
    _expect_bad_input(out, capsys, *data, match="maximum positions 1024")
    _expect_bad_input(out, capsys, *data, "train.method=oracle", match="noise mask")
    assert not (out / "runs").exists()


# ----------------------------------------------------------------------------- online scoring and TensorBoard


@pytest.mark.slow
def test_online_scoring_matches_offline_scores(smoke_out: Path) -> None:
    from selective_lm.training.models import load_reference_model

    cfg = load_config("smoke", overrides=["train.method=topk", "train.ratio=0.5"])
    offline = train(cfg, smoke_out, "offline")
    # Online must not quietly use the stored scores: make them wrong (their fingerprints still match).
    ref_loss = smoke_out / "scores" / "train" / "ref_loss.npy"
    np.save(ref_loss, np.zeros_like(np.load(ref_loss)))
    online_cfg = load_config("smoke", overrides=["train.method=topk", "train.ratio=0.5", "scoring.mode=online"])
    online = train(online_cfg, smoke_out, "online", reference_model=load_reference_model(online_cfg, smoke_out))
    # The online reference's losses are the stored ones in another batch shape: the scores within their noise.
    assert_same_logs(read_log(smoke_out / "runs" / "offline"), read_log(smoke_out / "runs" / "online"),
                     ("loss", "score_selected", "score_unselected", "grad_norm"))
    assert_same_first_selection(smoke_out, cfg, ["offline", "online"])  # ties within the scores' noise
    for key, value in offline["selection"].items():
        assert _close(value, online["selection"][key], 1e-4), key


def test_metrics_reach_tensorboard(smoke_out: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert smoke_train(smoke_out, "train.method=topk", "train.ratio=0.5", "train.report_to=tensorboard") == 0
    run = smoke_out / "runs" / "topk-r0.5"
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    log = read_log(run, timings=True)
    tags = set(events.Tags()["scalars"])
    kinds = {t for t in tags if t.startswith("selected_by_kind/")}
    # kind_counts (per-kind pairs, for the analysis) stays in log.jsonl
    assert tags - kinds == LOG_KEYS - {"step", "selected_by_kind", "kind_counts"} and "selected_by_kind/web" in kinds
    for key in ("loss", "lr", "selected_frac", "tokens_trained"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["step"] for r in log]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in log], rel=1e-6)


def test_metrics_reach_mlflow_and_trackers_are_asked_for(smoke_out: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """train.report_to=mlflow (a local file store: offline): log.jsonl's scalars per step, in an experiment named
    after the out dir and a run named after the run, with the run's settings as parameters, and no tb/ (TensorBoard
    is the default, not added); a tracker that is not installed or does not start is one line before any step."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise
    assert smoke_train(smoke_out, "train.method=topk", "train.ratio=0.5", "train.report_to=mlflow") == 0
    run = smoke_out / "runs" / "topk-r0.5"
    assert not (run / "tb").exists()
    client = MlflowClient()
    [tracked] = client.search_runs([client.get_experiment_by_name(smoke_out.resolve().name).experiment_id])
    assert tracked.info.run_name == "topk-r0.5" and tracked.info.status == "FINISHED"
    assert tracked.data.params["train.method"] == "topk" and tracked.data.params["train.ratio"] == "0.5"
    log = read_log(run, timings=True)
    assert set(tracked.data.metrics) == set(LOG_KEYS - {"step", "selected_by_kind", "kind_counts"}) | {
        f"selected_by_kind/{k}" for record in log for k in record["selected_by_kind"]}
    for key in ("loss", "lr", "selected_frac", "tokens_trained"):
        history = sorted(client.get_metric_history(tracked.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [r["step"] for r in log]
        assert [m.value for m in history] == pytest.approx([r[key] for r in log], rel=1e-6)

    import accelerate.tracking

    capsys.readouterr()
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    assert smoke_train(smoke_out, "train.name=untracked", "train.report_to=[tensorboard,mlflow]") == 2
    err = capsys.readouterr().err.strip()
    assert "train.report_to=tensorboard: tensorboard is not installed" in err and len(err.splitlines()) == 1, err
    monkeypatch.undo()  # MLflow 3 refuses a file store without MLFLOW_ALLOW_FILE_STORE (another: not cached)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "refused").as_uri())
    assert smoke_train(smoke_out, "train.name=refused", "train.report_to=mlflow") == 2
    err = capsys.readouterr().err.strip()
    assert "train.report_to=mlflow: a tracker did not start:" in err and len(err.splitlines()) == 1, err
    assert not (smoke_out / "runs" / "refused" / "log.jsonl").read_text()  # before any step


# ----------------------------------------------------------------------------- independent controls


def _selected(out: Path, name: str) -> np.ndarray:
    with np.load(out / "runs" / name / "selection_sample.npz") as z:
        return z["weights"] > 0


@pytest.mark.slow
def test_controls_draw_independently_unless_common_random_is_asked(smoke_out: Path) -> None:
    """random-r0.3 is not a subset of random-r0.5, nor random a copy of stochastic, unless common_random=true."""
    for extra in ((), ("train.common_random=true",)):
        suffix = "-crn" if extra else ""
        for method, ratio in (("random", 0.5), ("random", 0.3), ("stochastic", 0.5)):
            assert smoke_train(smoke_out, f"train.method={method}", f"train.ratio={ratio}", "train.steps=1",
                          f"train.name={method}-r{ratio}{suffix}", *extra) == 0
    half, third, stoch = (_selected(smoke_out, n) for n in ("random-r0.5", "random-r0.3", "stochastic-r0.5"))
    overlap = (half & third).sum() / third.sum()
    assert 0.3 < overlap < 0.7  # independent draws: about half of r0.3's tokens are also in r0.5
    assert (half & stoch).sum() / stoch.sum() < 0.75
    half, third = _selected(smoke_out, "random-r0.5-crn"), _selected(smoke_out, "random-r0.3-crn")
    assert (third <= half).all()  # common random numbers: the lower ratio takes a subset


def test_a_run_that_reads_the_scores_depends_on_the_reference(smoke_out: Path, capsys) -> None:
    """CLM selects nothing by score, but its diagnostics read the score store: a new reference makes it stale."""
    assert smoke_train(smoke_out, "train.steps=1") == 0
    (smoke_out / "config.yaml").unlink()  # a new reference in this out dir: its stored config would refuse it
    for stage in ("reference", "score"):
        assert main([stage, "--preset", "smoke", "--out", str(smoke_out), "reference.steps=2"]) == 0
    capsys.readouterr()
    assert smoke_train(smoke_out, "train.steps=1", "reference.steps=2") == 2  # `slm run` retrains such a run
    assert "another config" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_changes_memory_not_the_run(smoke_out: Path, lora: bool, monkeypatch) -> None:
    """The layers run again in backward (their MLPs counted), and the run is the same, dropout included."""
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    forward = modeling_llama.LlamaMLP.forward  # not the layer's: transformers wraps that one for the recompute

    def counted(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return forward(*a, **k)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    args = ["train.method=topk", "train.ratio=0.3", "train.steps=3", f"model.lora={str(lora).lower()}",
            "model.lora_dropout=0.1", "eval.every=0", "train.snapshot_every=0"]
    assert smoke_train(smoke_out, *args, "train.name=plain") == 0
    plain_calls, calls["n"] = calls["n"], 0
    assert smoke_train(smoke_out, *args, "train.name=recompute", "train.gradient_checkpointing=true") == 0
    assert calls["n"] == 2 * plain_calls > 0
    plain, recompute = read_log(smoke_out / "runs" / "plain"), read_log(smoke_out / "runs" / "recompute")
    for a, b in zip(plain, recompute, strict=True):
        assert _close(a["loss"], b["loss"], 1e-6) and _close(a["grad_norm"], b["grad_norm"], 1e-5), (a, b)
