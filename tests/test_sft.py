"""Supervised fine-tuning data (`data.format` prompt_response / chat): the loss mask, end to end.

What it must guarantee: loss_mask.npy is False exactly on the prompt's tokens (characters mapped
to tokens, multi-byte ones included) and the same for every data.num_proc; a text store is
written as before; selection never picks a prompt token and its ratio counts response tokens;
CLM on such a store is transformers' loss with labels -100 on the prompt; evaluation counts
response tokens only; an HF export labels the prompt -100.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers.cli import slm
from selective_lm.config import load_config
from selective_lm.data.assets import byte_tokenizer
from selective_lm.data.chat import render_chat
from selective_lm.data.corpora import Document
from selective_lm.errors import UserError
from selective_lm.prepare import prepare, write_store
from selective_lm.store.blocks import BlockOrder
from selective_lm.store.layout import load_store
from selective_lm.training.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# A chat template of the usual shape (a header per turn, a generation prompt); the byte tokenizer has none.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOPK = ("train.method=topk", "train.ratio=0.5", "train.steps=2")
CLM = ("train.method=clm", "train.steps=1")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _pairs(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Prompt/response rows; the prompts hold a two-byte character (é), so characters are not tokens."""
    return [{"prompt": f"Quelle est la somme {i} + {i + 1} ? Réponds en une phrase.",
             "response": f"La somme vaut {2 * i + 1}, car {i} + {i + 1} = {2 * i + 1}."}
            for i in range(offset, offset + n)]


def _conversations(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": "Réponds brièvement."},
                          {"role": "user", "content": f"Combien font {i} × 2 ?"},
                          {"role": "assistant", "content": f"{2 * i}."},
                          {"role": "user", "content": "Et fois trois ?"},
                          {"role": "assistant", "content": f"{3 * i}, évidemment."}]} for i in range(n)]


def _byte_mask(pieces: list[tuple[str, bool]]) -> list[bool]:
    """The expected loss mask of one document under the byte tokenizer: each character's flag once per byte."""
    return [flag for text, flag in pieces for ch in text for _ in ch.encode("utf-8")]


def _overrides(sources: dict[str, Path], fmt: str, *extra: str) -> list[str]:
    srcs = ", ".join(f"{k}: '{v}'" for k, v in sources.items())
    return ["data.corpus=custom", f"data.sources={{{srcs}}}", f"data.format={fmt}", "data.noise_rate=0",
            "data.max_tokens=null", *extra]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke model's byte tokenizer with a chat template, saved as a tokenizer directory."""
    path = tmp_path_factory.mktemp("chat-tokenizer")
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("fmt", ["prompt_response", "chat"])
def test_loss_mask_is_false_exactly_on_the_prompt_for_every_num_proc(tmp_path: Path, chat_tokenizer: Path,
                                                                      fmt: str) -> None:
    if fmt == "prompt_response":
        rows = _pairs(60)
        docs = [[(r["prompt"] + "\n", False), (r["response"], True)] for r in rows]
    else:
        rows = _conversations(40)
        docs = [[(f"<|{m['role']}|>\n", False), (f"{m['content']}\n", m["role"] == "assistant")]
                for r in rows for m in r["messages"]]
        docs = [sum(docs[i:i + 5], []) for i in range(0, len(docs), 5)]  # five messages per conversation
    src = _jsonl(tmp_path / "train.jsonl", rows)
    stores = {}
    for num_proc in (1, 2):
        extra = ("data.block_len=16", f"data.num_proc={num_proc}", f"model.tokenizer={chat_tokenizer}")
        cfg = load_config("smoke", overrides=_overrides({"train": src}, fmt, *extra))
        prepare(cfg, tmp_path / f"out{num_proc}")
        stores[num_proc] = tmp_path / f"out{num_proc}" / "data" / "train"
    for name in ("tokens.npy", "doc_ids.npy", "loss_mask.npy", "meta.json"):
        assert (stores[1] / name).read_bytes() == (stores[2] / name).read_bytes(), name
    store = load_store(stores[1])
    expected = np.concatenate([_byte_mask(d) + [True] for d in docs])  # each document's EOS is trained
    n = store.tokens.size
    np.testing.assert_array_equal(store.loss_mask.ravel(), expected[:n])
    assert 0 < store.meta["sft"]["loss_mask_tokens"] == int(store.loss_mask.sum()) < n
    assert store.meta["sft"]["format"] == fmt and store.meta["sources"]["format"] == fmt
    assert store.noise_mask is None


def test_a_cap_cuts_the_loss_mask_with_the_tokens(tmp_path: Path) -> None:
    """Documents without spans are trained whole; the cap cuts the mask where it cuts the tokens."""
    docs = [Document("abcd", trained=((2, 4),)), Document("xy")] * 3  # F F T T +EOS, then x y +EOS all trained
    meta = write_store(tmp_path / "s", docs, byte_tokenizer(), 4, cap=14, data_format="prompt_response")
    store = load_store(tmp_path / "s")
    expected = ([False, False, True, True, True] + [True] * 3) * 2
    np.testing.assert_array_equal(store.loss_mask.ravel(), expected[:12])
    assert meta["sft"]["loss_mask_tokens"] == 8 and meta["dropped_tail_tokens"] == 2


def test_text_stores_are_written_as_before(tmp_path: Path) -> None:
    """format=text: no loss mask anywhere, and the new data keys at their defaults stay out of fingerprints."""
    src = _jsonl(tmp_path / "t.jsonl", [{"text": f"Document {i} says hello."} for i in range(20)])
    cfg = load_config("smoke", overrides=["data.corpus=custom", f"data.sources={{train: '{src}'}}",
                                          "data.noise_rate=0", "data.block_len=16", "data.max_tokens=null"])
    assert not set(cfg.data.LATER_FIELDS) & set(cfg.data.hashed())
    prepare(cfg, tmp_path / "out")
    store = load_store(tmp_path / "out" / "data" / "train")
    assert store.loss_mask is None and "sft" not in store.meta and not (store.path / "loss_mask.npy").exists()
    assert set(store.meta["sources"]) == {"corpus", "source", "text_field"}
    expected = np.ones((3, 16), dtype=bool)
    expected[:, 0] = False
    np.testing.assert_array_equal(store.targets(np.arange(3), doc_boundaries=False), expected)


def test_targets_combine_position_documents_and_loss_mask(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "pr.jsonl", _pairs(10))
    prepare(load_config("smoke", overrides=_overrides({"train": src}, "prompt_response", "data.block_len=16")),
            tmp_path / "out")
    store = load_store(tmp_path / "out" / "data" / "train")
    rows = np.array([3, 0, 5])
    plain = store.targets(rows, doc_boundaries=False)
    assert not plain[:, 0].any()
    np.testing.assert_array_equal(plain[:, 1:], store.loss_mask[rows][:, 1:])
    doc = np.asarray(store.doc_ids[rows])
    bounded = store.targets(rows, doc_boundaries=True)
    np.testing.assert_array_equal(bounded[:, 1:], plain[:, 1:] & (doc[:, 1:] == doc[:, :-1]))
    unmasked = store.targets(rows, doc_boundaries=False, loss_mask=False)  # what scoring scores
    assert unmasked[:, 1:].all() and not unmasked[:, 0].any()
    np.testing.assert_array_equal(store.subset(rows).targets(slice(0, 3), doc_boundaries=False), plain)


def test_chat_template_that_rewrites_past_turns_is_refused(chat_tokenizer: Path) -> None:
    tok = load_tokenizer(load_config("smoke", overrides=[f"model.tokenizer={chat_tokenizer}"]).model)
    messages = _conversations(1)[0]["messages"]
    text, spans = render_chat(tok, messages)
    assert [text[a:b] for a, b in spans] == ["0.\n", "0, évidemment.\n"]
    # Like templates that drop the reasoning of earlier turns: an assistant turn renders differently once followed.
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' and not "
                         "loop.last %}[...]{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(UserError, match="incrementally"):
        render_chat(tok, messages)


# --------------------------------------------------------------------------- train, eval, export


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A prompt/response corpus prepared, referenced and scored, with a top-k (r=0.5) and a 1-step CLM run."""
    tmp = tmp_path_factory.mktemp("sft")
    sources = {"train": _jsonl(tmp / "train.jsonl", _pairs(120)),
               "reference": _jsonl(tmp / "reference.jsonl", _pairs(60, offset=200)),
               "val": _jsonl(tmp / "val.jsonl", _pairs(20, offset=400))}
    overrides = _overrides(sources, "prompt_response", "eval.splits=[val]")
    out = tmp / "out"
    for command in ("prepare", "reference", "score"):
        assert slm(command, out, *overrides) == 0, command
    for run in (TOPK, CLM):
        assert slm("train", out, *overrides, *run) == 0, run
    return {"out": out, "overrides": overrides, "cfg": load_config("smoke", overrides=overrides)}


def _first_step_rows(store_blocks: int, cfg: Any) -> np.ndarray:
    """The blocks of the trainer's first optimizer step, in stream order (one process, one micro-batch)."""
    return BlockOrder(store_blocks, cfg.train.seed).blocks(0, cfg.train.batch_size * cfg.train.grad_accum)


@pytest.mark.slow
def test_selection_never_picks_a_prompt_token_and_its_ratio_counts_responses(sft_out: dict[str, Any]) -> None:
    out, cfg = sft_out["out"], sft_out["cfg"]
    store = load_store(out / "data" / "train")
    run = out / "runs" / "topk-r0.5"
    sample = np.load(run / "selection_sample.npz")
    rows = _first_step_rows(store.n_blocks, cfg)
    np.testing.assert_array_equal(sample["rows"], rows)
    selected = sample["weights"] > 0
    assert selected.any() and not (selected & ~np.asarray(store.loss_mask[rows])).any()
    targets = store.targets(rows, doc_boundaries=False)
    n_response = int(targets.sum())
    assert n_response < targets.shape[0] * (targets.shape[1] - 1)  # prompts are there, and not counted
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert first["tokens_trained"] == int(selected.sum()) == int(np.floor(0.5 * n_response + 0.5))
    assert first["selected_frac"] == pytest.approx(first["tokens_trained"] / n_response)


@pytest.mark.slow
def test_clm_equals_transformers_loss_with_prompt_labels_ignored(sft_out: dict[str, Any]) -> None:
    """Step 1's logged loss is computed before the first update, from the base model (LoRA B = 0)."""
    out, cfg = sft_out["out"], sft_out["cfg"]
    store = load_store(out / "data" / "train")
    rows = _first_step_rows(store.n_blocks, cfg)
    ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
    # transformers shifts the labels itself: position 0's label is never a target; -100 on the prompt.
    labels = ids.masked_fill(~torch.from_numpy(np.asarray(store.loss_mask[rows])), -100)
    model = load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))).eval()
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=labels).loss)
    first = json.loads((out / "runs" / "clm" / "log.jsonl").read_text().splitlines()[0])
    assert first["tokens_trained"] == int((labels[:, 1:] != -100).sum())
    assert first["selected_frac"] == 1.0
    assert first["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_eval_counts_response_tokens_only(sft_out: dict[str, Any]) -> None:
    out, overrides = sft_out["out"], sft_out["overrides"]
    assert slm("eval", out, *overrides, *CLM) == 0
    store = load_store(out / "data" / "val")
    targets = store.targets(np.arange(store.n_blocks), doc_boundaries=False)
    result = json.loads((out / "runs" / "clm" / "eval.json").read_text())["val"]
    losses = np.load(out / "runs" / "clm" / "token_losses" / "val.npy")
    assert result["tokens"] == int(targets.sum()) < store.n_blocks * (store.block_len - 1)
    np.testing.assert_array_equal(np.isfinite(losses), targets)


@pytest.mark.slow
@pytest.mark.parametrize("run", [TOPK, CLM], ids=["topk", "clm"])
def test_hf_export_labels_the_prompt_minus_100(sft_out: dict[str, Any], run: tuple[str, ...]) -> None:
    import datasets

    out, overrides = sft_out["out"], sft_out["overrides"]
    assert slm("export-selected", out, *overrides, *run, "--format", "hf") == 0
    table = datasets.load_from_disk(str(out / "selected_hf")).with_format("numpy")
    store = load_store(out / "data" / "train")
    trained = np.asarray(table["labels"]) != -100
    targets = store.targets(np.arange(store.n_blocks), doc_boundaries=False)
    assert trained.any() and not (trained & ~np.asarray(store.loss_mask)).any()
    if run == CLM:  # ratio 1: exactly the response tokens
        np.testing.assert_array_equal(trained, targets)


@pytest.mark.slow
def test_the_whole_grid_runs_and_reports_on_sft_data(sft_out: dict[str, Any], tmp_path: Path) -> None:
    """`slm run` on a store without noise: the report reads missing noise shares as not applicable."""
    out = tmp_path / "out"
    shutil.copytree(sft_out["out"], out)
    assert slm("run", out, *sft_out["overrides"], "analysis.bucket_split=val", "grid.methods=[topk]",
               "grid.ratios=[0.5]") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["selection"]["topk-r0.5"]["noise_selected_frac"] is None
    assert (out / "report.md").is_file() and (out / "plots" / "selection.png").is_file()
