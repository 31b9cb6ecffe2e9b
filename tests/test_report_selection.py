"""selection.html and report.md's document table on a constructed out dir: a train store of known documents, a score
store, the base model's step-0 losses on some blocks, runs' selection samples and per-document totals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from selective_lm.analysis.documents import extremes, group_means, trained_shares
from selective_lm.data.assets import byte_tokenizer
from selective_lm.report import write_report
from selective_lm.report.page import HTML_BLOCKS
from selective_lm.store.layout import load_store

T = 16  # block_len
N_DOCS = 12  # two blocks each
TRICKY = 1  # the document whose text needs escaping
# Shares the top-k run trained per document; the last one is read for too few targets to be ranked.
SHARES = [0.5, 0.1, 0.9, 0.3, 0.7, 0.05, 0.95, 0.2, 0.6, 0.4, 0.8, 0.0]
EXCESS = {10: 0.25, 12: -0.5}  # base − reference on the blocks the base model was evaluated on (docs 5 and 6)


def _text(d: int) -> str:
    text = f"doc {d} <script>|x*_" if d == TRICKY else f"document number {d} says hello there"
    return (text * 3)[: 2 * T]


def _store(out: Path, kinds: bool) -> None:
    """data/train with N_DOCS documents of 2 * T byte tokens; with `kinds`, token kinds (clean, web) and a noise mask
    as CHAMP's stores have them, else none (a custom corpus)."""
    tok = byte_tokenizer()
    tokens = np.array([tok(_text(d))["input_ids"] for d in range(N_DOCS)], np.int32).reshape(-1, T)
    docs = np.repeat(np.arange(N_DOCS, dtype=np.int32), 2 * T).reshape(-1, T)
    d = out / "data" / "train"
    d.mkdir(parents=True)
    np.save(d / "tokens.npy", tokens)
    np.save(d / "doc_ids.npy", docs)
    meta = {"n_blocks": len(tokens), "block_len": T, "n_docs": N_DOCS}
    if kinds:
        kind = np.zeros(tokens.shape, np.uint8)
        kind[10, 4:9] = 1
        np.save(d / "noise_kind.npy", kind)
        np.save(d / "noise_mask.npy", kind == 1)
        meta["noise"] = {"kind_names": ["clean", "web"]}
    (d / "meta.json").write_text(json.dumps(meta))
    ref = np.full(tokens.shape, 2.0, np.float32) + np.arange(len(tokens), dtype=np.float32)[:, None] / 100
    ref[:, 0] = np.nan
    (out / "scores" / "train").mkdir(parents=True)
    np.save(out / "scores" / "train" / "ref_loss.npy", ref)
    (out / "scores" / "train" / "meta.json").write_text(json.dumps({"dtype": "float32"}))
    losses = out / "base" / "token_losses"
    losses.mkdir(parents=True)
    fp = load_store(d).fingerprint
    for name, row in (("train", 10), ("selection_sample", 12)):
        np.save(losses / f"{name}.npy", ref[[row]] + EXCESS[row])
        (losses / f"{name}.json").write_text(json.dumps({"store": fp, "rows": [row]}))


def _results(out: Path, runs: dict[str, tuple[str, int]]) -> None:
    entries = {n: {"method": m, "ratio": 0.5, "seed": s, "steps": 3} for n, (m, s) in runs.items()}
    (out / "results.json").write_text(json.dumps({"runs": entries}))


def _sample(out: Path, name: str, rows: list[int], weights: np.ndarray) -> None:
    d = out / "runs" / name if name != "reference" else out / name
    d.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(load_store(out / "data" / "train").tokens)[rows].astype(np.int64)
    np.savez(d / "selection_sample.npz", rows=np.array(rows), tokens=tokens, weights=weights.astype(np.float32))


_SPAN = re.compile(r"<span class='([^']*)'(?: style='([^']*)')? title='([^']*)'>(.*?)</span>", re.S)


def _rows(page: str, block: int) -> dict[str, list[tuple[str, ...]]]:
    """run -> its spans (class, style, title, text) in block `block`'s section of the page."""
    section = page.split(f"<h3>Block {block}</h3>")[1].split("<h")[0]
    found = {}
    for part in section.split("<div class='row' data-run='")[1:]:
        name = part.split("'", 1)[0]
        found[name] = _SPAN.findall(part)
    return found


def test_page_shows_every_run_on_the_blocks_they_all_trained(tmp_path: Path) -> None:
    _store(tmp_path, kinds=True)
    _results(tmp_path, {"reference": ("reference", 0), "clm": ("clm", 0), "topk-r0.5": ("topk", 0),
                        "random-r0.5": ("random", 0), "topk-r0.5-s1": ("topk", 1)})
    rng = np.random.default_rng(0)
    seed0 = [10, 3, 12, 7]  # the first selection unit of seed 0: every run of it sampled these
    weights = {"clm": np.ones((4, T)), "topk-r0.5": (rng.random((4, T)) < 0.5) * 1.0,
               "random-r0.5": (rng.random((4, T)) < 0.5) * 1.0}
    for name, w in weights.items():
        w[:, 0] = 0.0
        _sample(tmp_path, name, seed0, w)
    _sample(tmp_path, "topk-r0.5-s1", [1, 2, 5, 6], np.ones((4, T)))
    _sample(tmp_path, "reference", [0, 1, 2, 3], np.ones((4, T)))  # the reference's own split: no row

    write_report(tmp_path, byte_tokenizer())
    page = (tmp_path / "selection.html").read_text()
    assert "data-run='reference'" not in page and "<script" not in page and ">&lt;</span>" in page  # byte tokens
    assert "<h2>seed 0: 3 runs</h2>" in page and "<h2>seed 1: 1 run</h2>" in page
    assert [int(b) for b in re.findall(r"<h3>Block (\d+)</h3>", page)] == seed0[:HTML_BLOCKS] + [1, 2, 5]
    for b, row in enumerate(seed0[:HTML_BLOCKS]):
        spans = _rows(page, row)
        assert list(spans) == ["clm", "random-r0.5", "topk-r0.5"]  # the report's order
        for a in spans:
            for c in spans:
                differ = [t for t in range(T) if spans[a][t] != spans[c][t]]
                assert differ == np.flatnonzero(weights[a][b] != weights[c][b]).tolist(), (row, a, c)
        titles = [s[2] for s in spans["topk-r0.5"]]
        if row in EXCESS:  # the step-0 score on hover where the base model was measured, else the reference's loss
            ref = 2.0 + row / 100
            assert all(f"excess {EXCESS[row]:+.3f} (base {ref + EXCESS[row]:.3f} − reference {ref:.3f})" in t
                       for t in titles[1:])
        else:
            assert all("reference loss" in t and "excess" not in t for t in titles[1:])
        assert "excess" not in titles[0] and "reference" not in titles[0]  # position 0 has no target
        assert all("kind clean" in t or "kind web" in t for t in titles)
    web = _rows(page, 10)["clm"]
    assert all("noise" in web[t][0] and "kind web" in web[t][2] for t in range(4, 9))


def _table(md: str, title: str) -> list[list[str]]:
    part = md.split(f"### {title}\n\n")[1].split("\n\n")[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in part.splitlines()[2:]]


def test_document_table_ranks_the_main_runs_documents_on_a_custom_corpus(tmp_path: Path) -> None:
    _store(tmp_path, kinds=False)
    _results(tmp_path, {"clm": ("clm", 0), "random-r0.5": ("random", 0), "topk-r0.5": ("topk", 0)})
    valid = np.full(N_DOCS, 2 * T - 2.0)
    valid[-1] = 5  # read for fewer than MIN_DOC_TOKENS targets: not ranked
    d = tmp_path / "runs" / "topk-r0.5"
    d.mkdir(parents=True)
    np.savez(d / "doc_selection.npz", doc_ids=np.arange(N_DOCS), selected=np.array(SHARES) * valid, valid=valid,
             steps=np.int64(3))
    write_report(tmp_path, byte_tokenizer())
    md = (tmp_path / "report.md").read_text()
    assert "trained weight ÷ targets read, summed over its 3 steps" in md and "(1 read for fewer are left out)" in md
    least, most = _table(md, "Trained least"), _table(md, "Trained most")
    assert [r[0] for r in least] == ["5", "1", "7", "3", "9"] and [r[0] for r in most] == ["6", "2", "10", "4", "8"]
    assert [r[1] for r in least] == ["0.050", "0.100", "0.200", "0.300", "0.400"]
    assert [r[1] for r in most] == ["0.950", "0.900", "0.800", "0.700", "0.600"]
    assert least[0][3] == "+0.250 (15 tokens)" and most[0][3] == "-0.500 (15 tokens)" and least[1][3] == "—"
    assert least[2][4] == "document number 7 says hello the"  # the start of the document, decoded
    tricky = least[1][4]
    assert "&lt;script&gt;\\|x\\*\\_" in tricky and "<script" not in md and "|x*" not in md

    write_report(tmp_path)  # without a tokenizer: the ranks stay, no text
    assert _table((tmp_path / "report.md").read_text(), "Trained least")[0][4] == "—"


def test_document_table_without_totals_says_why(tmp_path: Path) -> None:
    _results(tmp_path, {"clm": ("clm", 0), "topk-r0.5": ("topk", 0)})
    write_report(tmp_path)
    assert "No per-document selection: no runs/topk-r0.5/doc_selection.npz" in (tmp_path / "report.md").read_text()
    _results(tmp_path, {"clm": ("clm", 0)})
    write_report(tmp_path)
    assert "No per-document selection: no selecting run" in (tmp_path / "report.md").read_text()


def test_document_helpers() -> None:
    keep, shares = trained_shares(np.array([1.0, 0.0, 3.0, 2.0]), np.array([10.0, 0.0, 30.0, 4.0]), 5)
    assert keep.tolist() == [0, 2] and shares == pytest.approx([0.1, 0.1])
    low, high = extremes(np.array([0.3, 0.1, 0.2]), 5)
    assert low.tolist() == [1, 2] and high.tolist() == [0]  # never one document twice
    mean, count = group_means(np.array([[3, 3, 1], [1, 2, 2]]), np.array([[1.0, np.nan, 2.0], [4.0, 5.0, 7.0]]),
                              np.array([2, 9, 1, 3]))
    assert count.tolist() == [2, 0, 2, 1] and np.allclose(mean, [6.0, np.nan, 3.0, 1.0], equal_nan=True)
