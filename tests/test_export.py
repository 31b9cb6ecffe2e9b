"""`slm export-selected` end to end through the CLI, on short smoke runs.

What an export must guarantee: one JSONL line per document of the train store, each naming the
run; character spans sorted, disjoint, inside the text and spelling `selected_text`; the run's
ratio selected per block; the same bytes on every export; the oracle never selecting injected
noise; and an unfinished run refused with one line, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers.cli import slm
from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.store.layout import load_store
from selective_lm.training.models import load_tokenizer, token_texts

TOPK = ("train.method=topk", "train.ratio=0.5", "train.steps=2")
ORACLE = ("train.method=oracle", "train.steps=2")


pytestmark = pytest.mark.usefixtures("one_thread")



def _export(out: Path, *overrides: str, stored: bool = False) -> bytes:
    """Run `slm export-selected` (with the smoke preset, or the out dir's stored config) and return the bytes of
    selected.jsonl."""
    code = main(["export-selected", "--out", str(out), *overrides]) if stored else slm("export-selected", out,
                                                                                       *overrides)
    assert code == 0
    return (out / "selected.jsonl").read_bytes()


def _records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


@pytest.fixture(scope="module")
def exported(_smoke_template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The smoke out dir with a top-k (r=0.5) and an oracle run of 2 steps, each exported twice."""
    out = tmp_path_factory.mktemp("export") / "out"
    shutil.copytree(_smoke_template, out)
    files: dict[str, Any] = {"out": out}
    for name, overrides in (("topk-r0.5", TOPK), ("oracle", ORACLE)):
        assert slm("train", out, *overrides) == 0
        files[name] = _export(out, *overrides)
        files[f"{name}/again"] = _export(out, *overrides)
    return files


@pytest.mark.slow
def test_one_line_per_document_naming_the_run(exported: dict[str, Any]) -> None:
    store = load_store(exported["out"] / "data" / "train")
    doc_ids = np.unique(np.asarray(store.doc_ids))
    for name in ("topk-r0.5", "oracle"):
        records = _records(exported[name])
        assert len(records) == len(doc_ids) == store.meta["n_docs"]
        assert [r["doc_id"] for r in records] == doc_ids.tolist()
        assert {r["run"] for r in records} == {name}
        assert sum(r["n_tokens"] for r in records) == store.tokens.size  # every stored token, once
        documents = store.meta.get("documents") or []
        for r in records:
            if r["doc_id"] < len(documents):
                assert r["source_id"] == documents[r["doc_id"]]


@pytest.mark.slow
def test_spans_are_sorted_disjoint_inside_the_text_and_spell_the_selection(exported: dict[str, Any]) -> None:
    for name in ("topk-r0.5", "oracle"):
        for r in _records(exported[name]):
            text, spans = r["text"], r["spans"]
            previous_end = 0
            for span in spans:
                assert 0 <= previous_end <= span["start"] <= span["end"] <= len(text), (r["doc_id"], spans)
                previous_end = span["end"]
            assert r["selected_text"] == "".join(text[s["start"]:s["end"]] for s in spans)
            assert 0 <= r["n_selected"] <= r["n_tokens"]
            assert (r["n_selected"] == 0) == (not spans)


@pytest.mark.slow
def test_topk_selects_the_ratio_of_each_block(exported: dict[str, Any]) -> None:
    store = load_store(exported["out"] / "data" / "train")
    records = _records(exported["topk-r0.5"])
    assert all(r["method"] == "topk" and r["ratio"] == 0.5 and r["score"] == "excess" for r in records)
    n_valid = store.n_blocks * (store.block_len - 1)  # every position but the first of a block has a target
    selected = sum(r["n_selected"] for r in records)
    # sequence scope: round(0.5 * 63) = 32 of each block's 63 targets
    per_block = int(np.floor((store.block_len - 1) * 0.5 + 0.5))
    assert selected == store.n_blocks * per_block
    assert selected / n_valid == pytest.approx(0.5, abs=1 / store.block_len)


@pytest.mark.slow
def test_export_is_deterministic(exported: dict[str, Any]) -> None:
    for name in ("topk-r0.5", "oracle"):
        assert exported[name] == exported[f"{name}/again"]


@pytest.mark.slow
def test_oracle_never_selects_injected_noise(exported: dict[str, Any]) -> None:
    """The oracle selects every target that is not noise: compare token counts and characters per document."""
    out = exported["out"]
    store = load_store(out / "data" / "train")
    assert store.noise_mask is not None and store.noise_mask.any()
    tokenizer = load_tokenizer(load_config("smoke").model)
    flat_tokens = np.asarray(store.tokens).reshape(-1)
    flat_noise = np.asarray(store.noise_mask).reshape(-1)
    flat_docs = np.asarray(store.doc_ids).reshape(-1)
    has_target = (np.arange(flat_tokens.size) % store.block_len) != 0
    expected_keep = has_target & ~flat_noise
    records = _records(exported["oracle"])
    assert sum(r["n_selected"] for r in records) == int(expected_keep.sum())
    noisy_docs = 0
    for r in records:
        pos = np.flatnonzero(flat_docs == r["doc_id"])
        keep = expected_keep[pos]
        assert r["n_selected"] == int(keep.sum()), r["doc_id"]
        texts = token_texts(tokenizer, flat_tokens[pos].tolist())
        assert "".join(texts) == r["text"]
        offsets = np.cumsum([0] + [len(t) for t in texts])
        kept_chars = np.zeros(len(r["text"]), dtype=bool)
        for i in np.flatnonzero(keep):
            kept_chars[offsets[i]:offsets[i + 1]] = True
        span_chars = np.zeros(len(r["text"]), dtype=bool)
        for s in r["spans"]:
            span_chars[s["start"]:s["end"]] = True
        np.testing.assert_array_equal(span_chars, kept_chars)
        noisy_docs += bool(flat_noise[pos].any())
    assert noisy_docs > 0  # the check above covered documents with noise in them


def test_unfinished_run_exits_2_and_writes_nothing(smoke_out: Path, capsys) -> None:
    def refused(*overrides: str) -> str:
        capsys.readouterr()
        assert slm("export-selected", smoke_out, *overrides) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("slm: error: "), err
        assert not (smoke_out / "selected.jsonl").exists()
        return lines[0]

    assert "has not finished training" in refused(*TOPK)  # never trained
    run = smoke_out / "runs" / "topk-r0.5"
    (run / "checkpoints").mkdir(parents=True)  # a run killed before its end: no train.json
    (run / "log.jsonl").write_text('{"step": 1}\n')
    assert "has not finished training" in refused(*TOPK)


@pytest.mark.slow
def test_doc_boundaries_keep_document_starts_out_of_the_export(tmp_path: Path) -> None:
    """Under data.doc_boundaries the run never trains on a document's first token: neither may the export."""
    out = tmp_path / "out"
    overrides = ("data.doc_boundaries=true", "train.method=clm", "train.steps=1")
    assert slm("prepare", out, *overrides) == 0
    assert slm("train", out, *overrides) == 0
    records = _records(_export(out, *overrides))
    store = load_store(out / "data" / "train")
    docs = np.asarray(store.doc_ids)
    # targets: not a block's first position, and the previous token in the same document
    has_target = np.zeros(docs.shape, dtype=bool)
    has_target[:, 1:] = docs[:, 1:] == docs[:, :-1]
    assert (docs[:, 1:] != docs[:, :-1]).any()  # some document starts inside a block
    per_doc = np.bincount(docs.reshape(-1), weights=has_target.reshape(-1), minlength=len(records))
    assert [r["n_selected"] for r in records] == per_doc.astype(int).tolist()  # CLM: every target, no other


@pytest.mark.slow
def test_hf_export_trains_with_transformers_trainer_on_exactly_the_selection(exported: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """`--format hf`: labels -100 off the selection; one `Trainer` step's loss is our mean over the selected tokens."""
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    from selective_lm.method.loss import forward_hidden, token_losses
    from selective_lm.training.models import load_model

    out = exported["out"]
    assert slm("export-selected", out, "--format", "hf", *TOPK) == 0
    ds = datasets.load_from_disk(str(out / "selected_hf"))
    store = load_store(out / "data" / "train")
    ids, labels = np.array(ds["input_ids"]), np.array(ds["labels"])
    assert np.array_equal(ids, store.tokens) and np.array_equal(np.array(ds["attention_mask"]), np.ones_like(ids))
    keep = labels != -100
    assert np.array_equal(labels[keep], ids[keep]) and not keep[:, 0].any()
    per_block = keep.sum(axis=1)  # top-k 0.5 per block, as the JSONL export (sequence scope)
    assert per_block.sum() == sum(r["n_selected"] for r in _records(exported["topk-r0.5"]))
    cfg = load_config("smoke")
    with torch.no_grad():
        model = load_model(cfg.model)
        hidden, head = forward_hidden(model, torch.from_numpy(ids))
        ours = token_losses(hidden, head, torch.from_numpy(ids), torch.from_numpy(keep))
    expected = float(ours[torch.from_numpy(keep)].mean())
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=len(ds), max_steps=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    result = Trainer(model=load_model(cfg.model), args=args, train_dataset=ds).train()
    assert result.training_loss == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def default_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make run`'s study at smoke size: its preset's partial score store (scoring.blocks=used), a short grid."""
    out = tmp_path_factory.mktemp("study") / "out"
    assert slm("run", out, "scoring.blocks=used", "grid.methods=[topk]", "grid.ratios=[0.5]", "grid.oracle=false") == 0
    return out


@pytest.mark.slow
def test_export_after_the_default_study_exports_the_scored_blocks_or_scores_the_rest(
        default_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As a new user types it after `make run`: no preset (the out dir's stored config), only train.* names the
    run. The partial store's blocks are exported and the summary says how many of how many; export.blocks=all
    scores the others first."""
    out = default_study
    store = load_store(out / "data" / "train")
    ref = np.load(out / "scores" / "train" / "ref_loss.npy")
    scored = np.flatnonzero(np.isfinite(ref[:, 1:]).all(axis=1))
    assert 0 < len(scored) < store.n_blocks  # the store is partial
    capsys.readouterr()
    records = _records(_export(out, *TOPK[:2], stored=True))
    summary = json.loads(capsys.readouterr().out)
    assert (summary["blocks"], summary["blocks_total"]) == (len(scored), store.n_blocks)
    assert "partial" in summary["note"] and f"{len(scored)} of {store.n_blocks}" in summary["note"]
    assert sum(r["n_tokens"] for r in records) == len(scored) * store.block_len  # the scored blocks, each once
    per_block = int(np.floor((store.block_len - 1) * 0.5 + 0.5))
    assert sum(r["n_selected"] for r in records) == len(scored) * per_block
    assert any(not r["complete"] for r in records)
    for r in records:  # each piece's text is its tokens' text
        assert r["selected_text"] == "".join(r["text"][s["start"]:s["end"]] for s in r["spans"])

    full = _records(_export(out, *TOPK[:2], "export.blocks=all", stored=True))
    summary = json.loads(capsys.readouterr().out)
    assert summary["blocks"] == store.n_blocks and summary["scored_for_export"] == store.n_blocks - len(scored)
    assert len(full) == store.meta["n_docs"] and all(r["complete"] for r in full)
    assert sum(r["n_selected"] for r in full) == store.n_blocks * per_block
    np.testing.assert_array_equal(np.load(out / "scores" / "train" / "ref_loss.npy"), ref)  # store untouched
