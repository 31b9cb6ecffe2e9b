"""Token store, packing, CHAMP splits and custom corpora (`slm prepare`)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selective_lm.config import load_config
from selective_lm.data.assets import byte_tokenizer
from selective_lm.data.corpora import Document
from selective_lm.data.corpora.champ import champ_partition, wrong_step_labels
from selective_lm.data.noise import KIND_IDS, KIND_NAMES, KINDS, LABEL_KINDS, NoiseInjector, is_noise
from selective_lm.errors import UserError
from selective_lm.prepare import BATCH_DOCS, NOISE_LAG, prepare, write_store
from selective_lm.store.layout import STORE_FORMAT, load_store
from selective_lm.training.models import tokenizer_fingerprint

WEB_MARKERS = ("utm_", "All rights reserved", "We use cookies", "min.js", "menu-item", "https://www.",
               "comments · Reply", "&nbsp;")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke prepare shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config("smoke")
    return cfg, out, prepare(cfg, out)


def _expected_stream(tok, texts: list[str]) -> np.ndarray:
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray([*x, tok.eos_token_id], np.int32) for x in ids])


# --------------------------------------------------------------------------- packing


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(min_size=0, max_size=60), min_size=1, max_size=12),
       block_len=st.integers(2, 24))
def test_blocks_are_the_concatenated_documents(tok, texts, block_len):
    texts = [t for t in texts if t.strip()]
    stream = _expected_stream(tok, texts) if texts else np.zeros(0, np.int32)
    with tempfile.TemporaryDirectory() as d:
        if len(stream) < block_len:
            with pytest.raises(UserError):
                write_store(Path(d) / "s", (Document(t) for t in texts), tok, block_len)
            return
        meta = write_store(Path(d) / "s", (Document(t) for t in texts), tok, block_len)
        store = load_store(Path(d) / "s")
        n = store.n_blocks * block_len
        assert store.tokens.shape == store.doc_ids.shape == (len(stream) // block_len, block_len)
        np.testing.assert_array_equal(store.tokens.ravel(), stream[:n])
        doc_of_token = np.repeat(np.arange(len(texts)), [len(tok(t, add_special_tokens=False)["input_ids"]) + 1
                                                         for t in texts])
        np.testing.assert_array_equal(store.doc_ids.ravel(), doc_of_token[:n])
        assert meta["dropped_tail_tokens"] == len(stream) - n < block_len
        assert meta["n_docs"] == doc_of_token[n - 1] + 1 and store.noise_mask is None and store.noise_kind is None


def test_eos_closes_each_document(tok, tmp_path):
    write_store(tmp_path / "s", [Document("ab"), Document("cde"), Document("f" * 20)], tok, 4)
    store = load_store(tmp_path / "s")
    flat, docs = store.tokens.ravel(), store.doc_ids.ravel()
    eos_at = np.flatnonzero(flat == tok.eos_token_id)
    assert list(eos_at) == [2, 6, 27]
    assert list(docs[eos_at]) == [0, 1, 2]  # the separator belongs to the document it ends


def test_cap_stops_the_stream_early(tok, tmp_path):
    pulled = []

    def docs():
        for i in range(1000):
            pulled.append(i)
            yield Document(f"document number {i} " * 3)

    meta = write_store(tmp_path / "s", docs(), tok, 16, cap=100)
    assert meta["n_tokens"] == 96 and meta["capped"] and meta["dropped_tail_tokens"] == 4
    assert len(pulled) < 100  # the generator was not drained


def test_streaming_keeps_memory_bounded(tok, tmp_path):
    n_docs, text = 6000, "The sum of the first n odd numbers is n^2, proven by induction on n. " * 4

    def docs():
        for i in range(n_docs):
            yield Document(f"{i}: {text}")

    tracemalloc.start()
    try:
        meta = write_store(tmp_path / "s", docs(), tok, 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_arrays = meta["n_tokens"] * 4 * 2  # tokens + doc_ids if they were held in memory
    assert meta["n_tokens"] > 1_500_000
    assert peak < full_arrays / 4, (peak, full_arrays)
    assert load_store(tmp_path / "s").tokens[-1].max() < 257


# --------------------------------------------------------------------------- CHAMP (smoke preset)


def test_smoke_prepare_writes_every_split(smoke, tok):
    cfg, out, summary = smoke
    assert set(summary) == {"reference", "train", "val_clean", "val_noisy"}
    for split, info in summary.items():
        store = load_store(out / "data" / split)
        meta = store.meta
        assert store.tokens.dtype == np.int32 and store.tokens.shape == (info["n_blocks"], cfg.data.block_len)
        assert np.load(out / "data" / split / "tokens.npy", mmap_mode="r").shape == store.tokens.shape
        assert meta["n_tokens"] == info["n_tokens"] <= cfg.data.cap(split)
        assert meta["tokenizer"] == cfg.model.name and meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
        assert meta["eos_id"] == tok.eos_token_id
        assert meta["split"] == split and meta["config_fingerprint"] and meta["fingerprint"]
        assert len(meta["documents"]) == meta["n_docs"] == int(store.doc_ids.max()) + 1
        assert (store.noise_mask is not None) == (split == "train")
        assert (store.noise_kind is not None) == (split in ("train", "val_noisy"))  # val_noisy: wrong-step labels
    assert summary["reference"]["n_tokens"] < summary["train"]["n_tokens"]


def test_no_problem_in_both_train_and_validation(smoke):
    cfg, out, _ = smoke
    metas = {s: load_store(out / "data" / s).meta for s in ("reference", "train", "val_clean", "val_noisy")}
    part = champ_partition(cfg.data)
    train_side = set(metas["train"]["problems"]) | set(metas["reference"]["problems"])
    val_side = set(metas["val_clean"]["problems"]) | set(metas["val_noisy"]["problems"])
    assert not train_side & val_side and len(train_side | val_side) == 270
    assert set(part.val_problems) == val_side
    for split, meta in metas.items():
        used = {d.split("|")[0] for d in meta["documents"]}
        assert used <= set(meta["problems"]), split
    assert len(part.val_problems) == pytest.approx(270 * cfg.data.val_fraction, abs=3)


def test_reference_conversations_never_in_train(smoke):
    cfg, out, _ = smoke
    part = champ_partition(cfg.data)
    assert not set(part.train_conversations) & set(part.reference_conversations)
    train_docs = set(load_store(out / "data" / "train").meta["documents"])
    ref_meta = load_store(out / "data" / "reference").meta
    ref_model_docs = {d for d in ref_meta["documents"] if "|" in d}
    assert ref_model_docs and not ref_model_docs & train_docs
    assert {tuple(d.split("|", 1)) for d in ref_model_docs} <= set(part.reference_conversations)
    assert {tuple(d.split("|", 1)) for d in train_docs} <= set(part.train_conversations)
    by_origin = ref_meta["tokens_by_origin"]
    assert by_origin["model"] / ref_meta["n_tokens"] == pytest.approx(cfg.data.reference_mix, abs=0.15)


def test_noise_rate_lands_on_the_configured_rate(smoke):
    cfg, out, summary = smoke
    store = load_store(out / "data" / "train")
    realized = float(store.noise_mask.mean())
    assert realized == pytest.approx(cfg.data.noise_rate, abs=0.02)
    assert store.meta["noise"]["realized_rate"] == pytest.approx(realized)
    assert summary["train"]["noise_rate"] == pytest.approx(realized, abs=1e-4)
    by_kind = store.meta["noise"]["realized_by_kind"]
    assert list(by_kind) == store.meta["noise"]["kind_names"] == list(KIND_NAMES)
    assert all(v > 0 for v in by_kind.values())
    assert sum(by_kind.values()) == pytest.approx(1.0)
    assert sum(by_kind[k] for k in KINDS) == pytest.approx(realized)


def test_noise_kind_is_stored_for_every_token(smoke, tok):
    _, out, _ = smoke
    store = load_store(out / "data" / "train")
    kind = store.noise_kind
    assert kind.dtype == np.uint8 and kind.shape == store.tokens.shape
    assert np.load(out / "data" / "train" / "noise_kind.npy", mmap_mode="r").shape == kind.shape
    np.testing.assert_array_equal(store.noise_mask, np.isin(kind, [KIND_IDS[k] for k in KINDS]))
    counts = np.bincount(np.asarray(kind).ravel(), minlength=len(KIND_NAMES))
    for i, name in enumerate(store.meta["noise"]["kind_names"]):
        assert store.meta["noise"]["realized_by_kind"][name] == pytest.approx(counts[i] / store.meta["n_tokens"])
    flat, docs = store.tokens.ravel(), store.doc_ids.ravel()
    assert not np.any(kind.ravel()[flat == tok.eos_token_id])  # the EOS of each document is clean
    header = kind.ravel() == KIND_IDS["header"]
    starts = np.flatnonzero(np.diff(docs)) + 1  # first token of each document (the first one may be cut)
    assert np.all(header[starts])  # every CHAMP train document opens with its problem statement
    text = tok.decode(flat[starts[0]:starts[1]][header[starts[0]:starts[1]]].tolist())
    assert text.startswith("Problem:") and text.rstrip().endswith("Solution:")
    assert not any(m in tok.decode(flat[header].tolist()) for m in WEB_MARKERS)


def test_noise_mask_marks_the_injected_text(smoke, tok):
    _, out, _ = smoke
    store = load_store(out / "data" / "train")
    flat, mask = store.tokens.ravel(), store.noise_mask.ravel()
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    noisy, clean = [], []
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(flat)], strict=True):
        (noisy if mask[a] else clean).append(tok.decode(flat[a:b].tolist()))
    noisy_text, clean_text = "\n".join(noisy), "\n".join(clean)
    assert sum(m in noisy_text for m in WEB_MARKERS) >= 2
    assert not any(m in clean_text for m in WEB_MARKERS)
    assert not np.any(mask[flat == tok.eos_token_id])


def test_prepare_is_deterministic(smoke, tmp_path):
    cfg, out, _ = smoke
    prepare(cfg, tmp_path, splits=["train", "reference"])
    for split in ("train", "reference"):
        a, b = load_store(out / "data" / split), load_store(tmp_path / "data" / split)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.doc_ids, b.doc_ids)
        assert a.meta["fingerprint"] == b.meta["fingerprint"]
    np.testing.assert_array_equal(load_store(out / "data" / "train").noise_mask,
                                  load_store(tmp_path / "data" / "train").noise_mask)
    np.testing.assert_array_equal(load_store(out / "data" / "train").noise_kind,
                                  load_store(tmp_path / "data" / "train").noise_kind)


def test_seed_and_val_fraction_change_the_partition():
    base = champ_partition(load_config("smoke").data)
    other = champ_partition(load_config("smoke", overrides=["data.seed=1"]).data)
    bigger = champ_partition(load_config("smoke", overrides=["data.val_fraction=0.3"]).data)
    assert base.val_problems != other.val_problems
    assert len(bigger.val_problems) > len(base.val_problems)


# --------------------------------------------------------------------------- custom corpora


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _custom(tmp_path: Path, sources: dict[str, Path | str], *extra: str):
    srcs = ",".join(f"{k}: '{v}'" for k, v in sources.items())
    return load_config("smoke", overrides=["data.corpus=custom", f"data.sources={{{srcs}}}",
                                           "data.block_len=16", "data.max_tokens=null", *extra])


def test_custom_jsonl_and_txt_sources(tmp_path, tok):
    texts = [f"Lemma {i}: every square is congruent to 0 or 1 mod 4." for i in range(30)]
    train = _jsonl(tmp_path / "train.jsonl", [{"body": t, "id": i} for i, t in enumerate(texts)])
    val = tmp_path / "val.txt"
    val.write_text("First paragraph,\nstill first.\n\nSecond paragraph.\n\n\nThird one.\n")
    cfg = _custom(tmp_path, {"train": train, "val_clean": val}, "data.text_field=body", "data.noise_rate=0")
    summary = prepare(cfg, tmp_path / "out")
    assert set(summary) == {"train", "val_clean"}  # no reference source: not written
    assert not (tmp_path / "out" / "data" / "reference").exists()
    train_store = load_store(tmp_path / "out" / "data" / "train")
    n = train_store.n_blocks * 16
    np.testing.assert_array_equal(train_store.tokens.ravel(), _expected_stream(tok, texts)[:n])
    assert train_store.noise_mask is None and train_store.meta["sources"]["source"] == str(train)
    paras = ["First paragraph,\nstill first.", "Second paragraph.", "Third one."]
    val_store = load_store(tmp_path / "out" / "data" / "val_clean")
    np.testing.assert_array_equal(val_store.tokens.ravel(), _expected_stream(tok, paras)[: val_store.n_blocks * 16])


def test_custom_train_gets_noise_and_slices_stream(tmp_path, tok):
    body = "\n".join(f"Step {k}: we compute {k} + {k} = {2 * k}, so the total grows by {2 * k}." for k in range(1, 8))
    train = _jsonl(tmp_path / "t.jsonl", [{"text": f"Doc{i:03d}x.\n{body}"} for i in range(300)])
    cfg = _custom(tmp_path, {"train": f"{train}@train[10:250]"}, "data.noise_rate=0.2")  # asked for: injected
    prepare(cfg, tmp_path / "out")
    store = load_store(tmp_path / "out" / "data" / "train")
    assert store.meta["noise"]["realized_rate"] == pytest.approx(0.2, rel=0.2)
    text = tok.decode(store.tokens.ravel().tolist())
    assert "Doc010x" in text and "Doc009x" not in text and "Doc250x" not in text  # numbers never touch these


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "needle"), [
    (["data.corpus=champs"], "did you mean 'champ'"),
    (["data.corpus=custom", "data.sources={val_clean: x.jsonl}"], "data.sources.train"),
    (["data.corpus=custom", "data.sources={train: /nonexistent/corpus.jsonl}"], "/nonexistent/corpus.jsonl not found"),
    (["data.corpus=custom", "data.sources={train: ./nowhere/corpus.xyz}"], "not found"),
    (["data.num_proc=0"], "data.num_proc"),
])
def test_bad_corpus_settings(tmp_path, overrides, needle):
    with pytest.raises(UserError, match=needle):
        prepare(load_config("smoke", overrides=overrides), tmp_path)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_bad_split_and_block_len(tmp_path):
    with pytest.raises(UserError, match="no split 'test'"):
        prepare(load_config("smoke"), tmp_path, splits=["test"])
    with pytest.raises(UserError, match="block_len"):
        load_config("smoke", overrides=["data.block_len=1"])


def test_missing_text_field_names_the_columns(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"content": "hello world", "meta": 1}])
    with pytest.raises(UserError, match=r"no text field 'text'.*content, meta"):
        prepare(_custom(tmp_path, {"train": src}), tmp_path / "out")


def test_csv_source_and_percent_slice(tmp_path, tok):
    csv = tmp_path / "c.csv"
    csv.write_text("text,n\n" + "".join(f'"row {i}, with a comma",{i}\n' for i in range(10)))
    cfg = _custom(tmp_path, {"train": f"{csv}@train[:50%]"}, "data.noise_rate=0", "data.block_len=4")
    prepare(cfg, tmp_path / "out")
    store = load_store(tmp_path / "out" / "data" / "train")
    stream = _expected_stream(tok, [f"row {i}, with a comma" for i in range(5)])
    np.testing.assert_array_equal(store.tokens.ravel(), stream[: store.n_blocks * 4])


def test_unreachable_hub_dataset(tmp_path):
    with pytest.raises(UserError, match="cannot load dataset 'someorg/no-such-dataset@.*Hub"):
        prepare(_custom(tmp_path, {"train": "someorg/no-such-dataset@train[:10]"}), tmp_path / "out")


def test_empty_corpus(tmp_path):
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(UserError, match="zero.jsonl is empty"):
        prepare(_custom(tmp_path, {"train": tmp_path / "zero.jsonl"}), tmp_path / "out")
    empty = _jsonl(tmp_path / "e.jsonl", [{"text": "   "}, {"text": ""}])
    with pytest.raises(UserError, match="no non-empty documents"):
        prepare(_custom(tmp_path, {"train": empty}), tmp_path / "out")
    tiny = _jsonl(tmp_path / "t.jsonl", [{"text": "hi"}])
    with pytest.raises(UserError, match="do not fill one block"):
        prepare(_custom(tmp_path, {"train": tiny}, "data.noise_rate=0"), tmp_path / "out")


def test_failed_write_leaves_no_store(tok, tmp_path):
    write_store(tmp_path / "s", [Document("an old complete store " * 5)], tok, 8)
    old = load_store(tmp_path / "s").meta["fingerprint"]

    def docs():
        yield Document("a new document " * 10)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_store(tmp_path / "s", docs(), tok, 8)
    with pytest.raises(RuntimeError):
        write_store(tmp_path / "fresh", docs(), tok, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp dirs, no half store
    assert load_store(tmp_path / "s").meta["fingerprint"] == old


def test_noisy_store_needs_its_kind_file(tok, tmp_path):
    line = "Step {}: we add 1 and 3 to get 4, which we keep for the next step of the argument."
    docs = [Document("Problem: 1+3?\n" + "\n".join(line.format(k) for k in range(6)), group=str(i), protect=14)
            for i in range(20)]
    meta = write_store(tmp_path / "s", docs, tok, 16, cap=1000, injector=NoiseInjector(0.2, {"numbers": 1.0}, 0))
    store = load_store(tmp_path / "s")
    kinds = np.asarray(store.noise_kind).ravel()
    assert meta["format"] == STORE_FORMAT and meta["capped"]
    assert {KIND_NAMES[k] for k in np.unique(kinds)} == {"clean", "header", "numbers", "numbers_context"}
    np.testing.assert_array_equal(store.noise_mask.ravel(), kinds == KIND_IDS["numbers"])
    (tmp_path / "s" / "noise_kind.npy").unlink()
    with pytest.raises(UserError, match="noise_kind.npy is missing"):
        load_store(tmp_path / "s")


HEAD = "Problem: add 1 and 3.\n\nSolution:\n"
SOLUTION = "First we add 1 and 3.\nSecond, we get 5.\nSo the answer is 5."


def test_wrong_step_labels_are_exact():
    """From the start index of CHAMP's annotation (in the unstripped message) to the solution's end."""
    text = HEAD + SOLUTION + "\n\nSummary: 5."
    raw = "  " + SOLUTION + "\n"  # the annotation's text is the model's message before stripping
    start = 2 + SOLUTION.index("Second")
    annotation = {"text": raw, "start_idx": start, "end_idx": start + 18, "author": "x"}
    wrong, end = len(HEAD) + SOLUTION.index("Second"), len(HEAD) + len(SOLUTION)
    assert text[wrong:wrong + 18] == raw[start:start + 18] == "Second, we get 5.\n"
    assert wrong_step_labels(text, len(HEAD), annotation) == (
        (len(HEAD), wrong, "before_wrong_step"), (wrong, end, "after_wrong_step"))
    assert wrong_step_labels(text, len(HEAD), {**annotation, "start_idx": 0})[0] == (
        len(HEAD), end, "after_wrong_step")  # wrong from its first character: nothing before it
    assert wrong_step_labels(text, len(HEAD), {**annotation, "start_idx": None, "end_idx": None}) == ()
    assert wrong_step_labels(text, len(HEAD), {**annotation, "text": "another solution"}) == ()
    assert wrong_step_labels(text, len(HEAD), None) == ()


@pytest.mark.parametrize("noise", [False, True])
def test_labels_become_exact_token_kinds(tok, tmp_path, noise):
    """Byte-level tokens: one per character, so the kinds are the label spans exactly; labels are never noise."""
    text = HEAD + SOLUTION + "\n\nSummary: 5."
    start = SOLUTION.index("Second")
    labels = wrong_step_labels(text, len(HEAD), {"text": SOLUTION, "start_idx": start, "end_idx": start + 5})
    docs = [Document("An unlabelled document comes first.", group="a"), Document(text, group="b", protect=len(HEAD),
                                                                               labels=labels)] * 3
    injector = NoiseInjector(0.3, {"web": 1.0}, 0) if noise else None
    meta = write_store(tmp_path / "s", docs, tok, 8, labelled=True, injector=injector)
    store = load_store(tmp_path / "s")
    kinds = np.asarray(store.noise_kind).ravel()
    assert meta["wrong_step"]["doc_ids"] == store.wrong_step_docs == [d for d in (1, 3, 5) if d < meta["n_docs"]]
    assert meta["wrong_step"]["tokens"] == {k: int((kinds == KIND_IDS[k]).sum()) for k in LABEL_KINDS}
    assert store.kind_names == list(KIND_NAMES)
    if noise:
        assert store.noise_mask is not None and not store.noise_mask.ravel()[np.isin(kinds, [7, 8])].any()
        np.testing.assert_array_equal(store.noise_mask.ravel(), is_noise(kinds))
        assert meta["noise"]["realized_rate"] == pytest.approx(store.noise_mask.mean())
        assert (kinds == KIND_IDS["after_wrong_step"]).sum() == 3 * (len(SOLUTION) - start)  # insertions only
        return
    assert store.noise_mask is None and meta["noise"] is None
    one = np.zeros(len(text) + 1, np.uint8)  # + EOS, clean
    one[len(HEAD):len(HEAD) + start] = KIND_IDS["before_wrong_step"]
    one[len(HEAD) + start:len(HEAD) + len(SOLUTION)] = KIND_IDS["after_wrong_step"]
    other = np.zeros(len(docs[0].text) + 1, np.uint8)
    expected = np.concatenate([other, one] * 3)
    np.testing.assert_array_equal(kinds, expected[:kinds.size])


def test_load_store_rejects_broken_stores(tok, tmp_path):
    with pytest.raises(UserError, match="no token store"):
        load_store(tmp_path / "missing")
    write_store(tmp_path / "s", [Document("x" * 100)], tok, 8)
    cases = {
        "meta.json": lambda p: p.unlink(),
        "tokens.npy": lambda p: p.write_bytes(p.read_bytes()[:-40]),
        "doc_ids.npy": lambda p: np.save(p, np.zeros((3, 8), np.int32)),
    }
    needles = {"meta.json": "no meta.json", "tokens.npy": "truncated or corrupt", "doc_ids.npy": "meta.json says"}
    for name, damage in cases.items():
        broken = tmp_path / f"broken-{name}"
        write_store(broken, [Document("x" * 100)], tok, 8)
        damage(broken / name)
        with pytest.raises(UserError, match=needles[name]):
            load_store(broken)
    (tmp_path / "s" / "tokens.npy").write_bytes(b"not a numpy file")
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_store(tmp_path / "s")


# --------------------------------------------------------------------------- parallel prepare (data.num_proc)


def test_num_proc_writes_the_same_store(tmp_path, tok):
    body = "\n".join(f"Step {k}: we compute {k} + {k} = {2 * k}, so the running total grows by {2 * k} again."
                     for k in range(1, 5))
    src = _jsonl(tmp_path / "t.jsonl", [{"text": f"Doc {i}.\n{body}"} for i in range(60 * BATCH_DOCS)])
    stores = {}
    for n in (1, 2, 3):
        summary = prepare(_custom(tmp_path, {"train": src}, f"data.num_proc={n}", "data.noise_rate=0.2"),
                          tmp_path / f"out{n}")
        assert not summary["train"]["reused"]
        stores[n] = tmp_path / f"out{n}" / "data" / "train"
    names = sorted(p.name for p in stores[1].iterdir())
    assert names == ["doc_ids.npy", "meta.json", "noise_kind.npy", "noise_mask.npy", "tokens.npy"]
    for n in (2, 3):  # every byte, meta.json included (it holds no timings)
        for name in names:
            assert (stores[n] / name).read_bytes() == (stores[1] / name).read_bytes(), (n, name)
    meta = load_store(stores[1]).meta
    assert meta["n_docs"] == 60 * BATCH_DOCS > 10 * NOISE_LAG * BATCH_DOCS  # the lagged feedback had time to act
    assert meta["noise"]["realized_rate"] == pytest.approx(0.2, abs=0.02)
    # num_proc is how a store is made, not what it holds: a store made by 3 processes is reused by 1
    assert prepare(_custom(tmp_path, {"train": src}, "data.noise_rate=0.2"), tmp_path / "out3")["train"]["reused"]


class _FailingTokenizer:
    """The byte tokenizer, failing on a batch that holds `trigger`, or killing its (worker) process."""

    def __init__(self, tok, trigger: str, kill: bool) -> None:
        self.tok, self.trigger, self.kill = tok, trigger, kill

    def __getattr__(self, name: str):
        return getattr(self.tok, name)

    def __call__(self, texts: list[str], **kwargs):
        if any(self.trigger in t for t in texts):
            if self.kill:
                os._exit(1)
            raise RuntimeError(f"cannot tokenize {self.trigger!r}")
        return self.tok(texts, **kwargs)


@pytest.mark.parametrize(("kill", "error", "needle"), [
    (False, RuntimeError, "cannot tokenize 'poison'"),  # the worker's own exception, as with num_proc=1
    (True, UserError, "worker process died.*lower data.num_proc"),
])
def test_a_failing_worker_stops_prepare_cleanly(tok, tmp_path, kill, error, needle):
    docs = [Document(f"document {i} " * 8) for i in range(20 * BATCH_DOCS)]
    docs.insert(10 * BATCH_DOCS, Document("poison"))
    with pytest.raises(error, match=needle):
        write_store(tmp_path / "s", docs, _FailingTokenizer(tok, "poison", kill), 8, num_proc=2)
    assert list(tmp_path.iterdir()) == []  # no store, no temp dir
    assert multiprocessing.active_children() == []  # the pool was shut down


def test_a_bad_row_mid_corpus_is_one_error_line(tmp_path, capfd):
    """The parse error surfaces while workers tokenize (the first 10 MB chunk of the JSON reader was good)."""
    good = "".join(json.dumps({"text": f"Lemma {i} holds.", "pad": "x" * 30_000}) + "\n" for i in range(400))
    (tmp_path / "bad.jsonl").write_text(good + "{not json\n" + good)
    with pytest.raises(UserError, match=r"cannot read .*bad.jsonl.*JSON parse error"):
        prepare(_custom(tmp_path, {"train": tmp_path / "bad.jsonl"}, "data.num_proc=2"), tmp_path / "out")
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own log line of the error
    assert not (tmp_path / "out" / "data" / "train").exists() and multiprocessing.active_children() == []


_PEAK_RSS = """
import json, resource, sys
from selective_lm.config import load_config
from selective_lm.prepare import prepare
cfg = load_config("smoke", overrides=["data.corpus=custom", "data.sources={train: %s}" % sys.argv[1],
                                      "data.max_tokens=null", "data.noise_rate=0", "data.num_proc=2"])
summary = prepare(cfg, sys.argv[2])["train"]
print(json.dumps({"main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, **summary}))
"""


@pytest.mark.slow
def test_prepare_streams_a_large_corpus_in_bounded_memory(tmp_path):
    """Peak RSS of a 2-process prepare of a 300 MB JSONL against a 30 MB one: it grows by far less than
    the extra input. Most of each row is a second column, so that reading 300 MB takes seconds while
    every row still goes through the reader, the workers and the packer."""
    pad = "x" * 30_000

    def corpus(mb: int) -> tuple[Path, int]:
        path, rows, size = tmp_path / f"c{mb}.jsonl", 0, 0
        with path.open("w") as f:
            while size < mb * 1_000_000:
                size += f.write(f'{{"text": "Lemma {rows}: every odd square is 1 mod 8.", "pad": "{pad}"}}\n')
                rows += 1
        return path, rows

    peaks = {}
    for mb in (30, 300):
        path, rows = corpus(mb)
        run = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(tmp_path / f"out{mb}")],
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peaks[mb] = json.loads(run.stdout.strip().splitlines()[-1])
        assert peaks[mb]["n_docs"] == rows
        path.unlink()
    print(peaks)
    extra_mb = 270 * 1e6 / 2**20
    for proc in ("main_mb", "workers_mb"):
        assert peaks[300][proc] - peaks[30][proc] < extra_mb / 4, (proc, peaks)

