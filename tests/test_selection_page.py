"""selection.html and the document table from a real tiny study (`slm run` on the scored smoke out dir, two seeds):
every training run of a seed shown on the blocks it read first, and the per-document totals the trainer summed."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import private_copy
from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.report.documents import MIN_DOC_TOKENS
from selective_lm.report.page import HTML_BLOCKS, HTML_MAX_TOKENS
from selective_lm.store.blocks import BlockOrder
from selective_lm.store.layout import load_store
from selective_lm.training.runstats import DocTotals

SEEDS = 2
OVERRIDES = ["grid.methods=[topk,random]", "grid.ratios=[0.5]", "grid.oracle=false", f"grid.seeds={SEEDS}",
             "eval.every=0", "train.snapshot_every=0"]
_SPAN = re.compile(r"<span class='([^']*)'(?: style='([^']*)')? title='([^']*)'>(.*?)</span>", re.S)


@pytest.fixture(scope="module")
def study(_smoke_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = private_copy(_smoke_template, tmp_path_factory.mktemp("study"))
    assert main(["run", "--preset", "smoke", "--out", str(out), *OVERRIDES]) == 0
    return out


def _training_runs(out: Path) -> dict[str, dict]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {n: r for n, r in runs.items() if r["method"] not in ("reference", "base")}


def _rows(section: str, block: int) -> dict[str, list[tuple[str, ...]]]:
    """run -> its spans (class, style, title, text) in block `block`'s part of a seed's section."""
    part = section.split(f"<h3>Block {block}</h3>")[1].split("<h3>")[0]
    return {p.split("'", 1)[0]: _SPAN.findall(p) for p in part.split("<div class='row' data-run='")[1:]}


@pytest.mark.slow
def test_page_shows_each_runs_own_selection_on_its_seeds_first_unit(study: Path) -> None:
    cfg = load_config("smoke", overrides=OVERRIDES)
    train = load_store(study / "data" / "train")
    runs = _training_runs(study)
    page = (study / "selection.html").read_text()
    assert "data-run='reference'" not in page and "data-run='base'" not in page
    ref = np.load(study / "scores" / "train" / "ref_loss.npy")
    base = np.load(study / "base" / "token_losses" / "selection_sample.npy")
    base_rows = json.loads((study / "base" / "token_losses" / "selection_sample.json").read_text())["rows"]
    shown_tokens = min(cfg.data.block_len, HTML_MAX_TOKENS)
    for seed in range(cfg.train.seed, cfg.train.seed + SEEDS):
        names = [n for n, r in runs.items() if r["seed"] == seed]
        assert len(names) == 3  # clm, random, topk
        first = BlockOrder(train.n_blocks, seed).blocks(0, cfg.train.batch_size)
        samples = {n: np.load(study / "runs" / n / "selection_sample.npz") for n in names}
        assert all(s["rows"].tolist() == first.tolist() for s in samples.values())  # every run sampled the same
        section = page.split(f"<h2>seed {seed}: {len(names)} runs</h2>")[1].split("<h2>")[0]
        shown = [int(b) for b in re.findall(r"<h3>Block (\d+)</h3>", section)]
        assert shown == first[:HTML_BLOCKS].tolist()
        topk, rnd = f"topk-r0.5-s{seed}", f"random-r0.5-s{seed}"
        assert (samples[topk]["weights"] != samples[rnd]["weights"]).any()  # the selections differ somewhere
        for i, row in enumerate(shown):
            spans = _rows(section, row)
            assert sorted(spans) == sorted(names) and all(len(s) == shown_tokens for s in spans.values())
            for a, c in combinations(names, 2):  # rows differ exactly where the runs' weights differ
                differ = [t for t in range(shown_tokens) if spans[a][t] != spans[c][t]]
                wa, wc = samples[a]["weights"][i][:shown_tokens], samples[c]["weights"][i][:shown_tokens]
                assert differ == np.flatnonzero(wa != wc).tolist(), (seed, row, a, c)
            # The hover's step-0 score is the base model's loss minus the reference's on that token.
            excess = base[base_rows.index(row)] - ref[row]
            for t, (_, _, title, _) in enumerate(spans[topk]):
                assert f"weight {samples[topk]['weights'][i][t]:.3g}" in title
                if np.isfinite(excess[t]):
                    assert f"excess {excess[t]:+.3f}" in title, (row, t)
                else:
                    assert "excess" not in title


@pytest.mark.slow
def test_document_totals_are_what_each_run_read_and_trained(study: Path) -> None:
    cfg = load_config("smoke", overrides=OVERRIDES)
    train = load_store(study / "data" / "train")
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    for name, run in _training_runs(study).items():
        summary = json.loads((study / "runs" / name / "train.json").read_text())
        with np.load(study / "runs" / name / "doc_selection.npz") as z:
            docs, selected, valid, steps = z["doc_ids"], z["selected"], z["valid"], int(z["steps"])
        assert steps == summary["steps"]
        # The targets read per document: the blocks of the run's stream, counted here from the store.
        rows = BlockOrder(train.n_blocks, run["seed"]).blocks(0, steps * per_step)
        targets = train.targets(rows, cfg.data.doc_boundaries)
        expected = np.bincount(np.asarray(train.doc_ids[rows])[targets], minlength=train.meta["n_docs"])
        assert docs.tolist() == np.flatnonzero(expected).tolist() and valid.tolist() == expected[docs].tolist()
        # Hard 0/1 weights: sums of small integers in float64, exact.
        assert selected.sum() == summary["tokens_trained"]
        assert (selected == valid).all() == (run["method"] == "clm")
    md = (study / "report.md").read_text()
    with np.load(study / "runs" / "topk-r0.5-s0" / "doc_selection.npz") as z:  # the main SLM run: the first top-k
        ranked = z["valid"] >= MIN_DOC_TOKENS
        shares = z["selected"][ranked] / z["valid"][ranked]
        least = int(z["doc_ids"][ranked][np.argmin(shares)])
    assert "of its target tokens that `topk-r0.5-s0` trained" in md
    table = md.split("### Trained least\n\n")[1].split("\n\n")[0].splitlines()
    assert table[2].startswith(f"| {least} | {shares.min():.3f} |")


def test_doc_totals_count_finished_steps_and_resume() -> None:
    totals = DocTotals(4, torch.device("cpu"))
    weights = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.5, 0.0]])
    valid = torch.tensor([[False, True, True], [False, True, True]])
    docs = torch.tensor([[0, 0, 1], [2, 2, 2]])
    totals.add(weights, valid, docs)
    totals.commit()
    totals.add(weights, valid, docs)  # a step cut short: never committed, never counted
    state = totals.into({}, lambda t: t)
    assert state["doc_totals"] == {"steps": 1, "doc_ids": [0, 1, 2], "selected": [1.0, 1.0, 0.5],
                                   "valid": [1.0, 1.0, 2.0]}
    resumed, other_rank = DocTotals(4, torch.device("cpu")), DocTotals(4, torch.device("cpu"))
    resumed.load(state, main=True)
    other_rank.load(state, main=False)  # summed over ranks when saved: only the main one carries the past
    resumed.add(weights[:1], valid[:1], docs[:1])
    resumed.commit()
    again = resumed.into({}, lambda t: t + other_rank.sums)["doc_totals"]
    assert again == {"steps": 2, "doc_ids": [0, 1, 2], "selected": [2.0, 2.0, 0.5], "valid": [2.0, 2.0, 2.0]}
    assert DocTotals(0, torch.device("cpu")).into({}, lambda t: t) == {}  # the reference's split: nothing


@pytest.mark.slow
def test_doc_totals_survive_an_interrupt_mid_step(smoke_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after step 4's micro-batch was added, before the step was committed: the checkpoint of step 3 and the
    resumed run's doc_selection.npz hold exactly the straight run's totals."""
    train = ["train", "--preset", "smoke", "--out", str(smoke_out), "train.method=topk", "train.ratio=0.5",
             "train.checkpoint_every=0"]
    assert main([*train, "train.name=straight"]) == 0
    commit = DocTotals.commit

    def interrupted(self: DocTotals) -> None:
        if self.steps == 3:
            raise KeyboardInterrupt
        commit(self)

    monkeypatch.setattr(DocTotals, "commit", interrupted)
    assert main([*train, "train.name=resumed"]) == 130
    state = json.loads((smoke_out / "runs" / "resumed" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["doc_totals"]["steps"] == 3
    monkeypatch.setattr(DocTotals, "commit", commit)
    assert main([*train, "train.name=resumed"]) == 0
    with np.load(smoke_out / "runs" / "straight" / "doc_selection.npz") as a, \
            np.load(smoke_out / "runs" / "resumed" / "doc_selection.npz") as b:
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
