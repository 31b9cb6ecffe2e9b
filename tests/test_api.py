"""The public Python API: `selective_loss` against `selection.select` + a naive loss, `score` against
`slm score` (and its resume), `SelectiveTrainer`'s optimizer step against `slm train`'s, the TRL recipe,
and bad input raising the CLI's messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import selective_lm
from helpers.cli import slm
from helpers.compare import assert_same_updates
from helpers.runs import assert_same_logs
from selective_lm import Selection, SelectiveCollator, SelectiveTrainer, score, selective_loss
from selective_lm.config import load_config
from selective_lm.errors import UserError
from selective_lm.method.selection import scores, select
from selective_lm.store.blocks import BlockOrder
from selective_lm.store.layout import load_store
from selective_lm.training.models import apply_lora, load_model, load_reference_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_is_cheap_and_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, selective_lm; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    assert selective_lm.__version__ and "SelectiveTrainer" in selective_lm.__all__
    with pytest.raises(AttributeError):
        selective_lm.nothing_here  # noqa: B018


# ---------------------------------------------------------------------------- selective_loss


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE `[B, T]` from full logits the plain way: logits t - 1 predict labels t; NaN elsewhere."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().clamp_min(0), reduction="none")
    out = torch.full(labels.shape, torch.nan)
    out[:, 1:] = torch.where(labels[:, 1:] != -100, ce.view(labels.shape[0], -1), torch.nan)
    return out


RULES = [
    Selection(method="topk", ratio=0.5),
    Selection(method="topk", ratio=0.3, scope="sequence"),
    Selection(method="random", ratio=0.5),
    Selection(method="stochastic", ratio=0.4, temperature=0.5),
    Selection(method="topk", rule="threshold", threshold=0.1),
    Selection(method="topk", ratio=0.5, soft=True),
    Selection(method="clm"),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.method}-{r.rule}-{r.scope}-{r.soft}")
def test_selective_loss_is_select_plus_the_naive_loss(rule: Selection) -> None:
    torch.manual_seed(0)
    b, t, v = 3, 9, 11
    logits = torch.randn(b, t, v, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    ref = torch.rand(b, t)
    ref[:, 0] = torch.nan
    out = selective_loss(logits, labels, ref, rule, generator=torch.Generator().manual_seed(3))
    own = _naive(logits, labels)
    valid = ~torch.isnan(own)
    r = rule.rule_used
    chosen = select(scores(r.score, own.detach(), ref), r.ratio, r.strategy, rule.scope, valid,
                    torch.Generator().manual_seed(3), temperature=rule.temperature, soft=rule.soft,
                    threshold=r.threshold)
    expected = torch.where(chosen != 0, own * chosen.float(), 0.0).sum()
    torch.testing.assert_close(out.weights, chosen.float())
    torch.testing.assert_close(out.loss_sum, expected)
    assert float(out.n_valid) == int(valid.sum()) and float(out.n_selected) == pytest.approx(float(chosen.sum()))
    (grad,) = torch.autograd.grad(out.mean(), logits)
    (want,) = torch.autograd.grad(expected / chosen.float().sum(), logits)
    torch.testing.assert_close(grad, want)


def test_hidden_states_and_head_give_the_logits_result() -> None:
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 13, bias=False)
    hidden = torch.randn(2, 8, 6)
    labels = torch.randint(0, 13, (2, 8))
    ref = torch.rand(2, 8)
    a = selective_loss(hidden, labels, ref, Selection(ratio=0.5), head=head, chunk_size=3)
    b = selective_loss(head(hidden), labels, ref, Selection(ratio=0.5))
    torch.testing.assert_close(a.loss_sum, b.loss_sum)
    torch.testing.assert_close(a.weights, b.weights)


# ---------------------------------------------------------------------------- bad input


def test_selective_loss_refuses_lists_and_arrays_naming_the_argument() -> None:
    """A list (a collator that returned lists, a numpy array) is refused with one line, not an AttributeError."""
    logits, labels = torch.randn(2, 6, 5), torch.randint(0, 5, (2, 6))
    rule = Selection(method="topk", ratio=0.5, score="loss")
    with pytest.raises(UserError, match=r"^labels must be a torch.Tensor, got list: convert it with torch.as_tensor"):
        selective_loss(logits, labels.tolist(), rule=rule)
    with pytest.raises(UserError, match=r"^logits_or_hidden must be a torch.Tensor, got ndarray"):
        selective_loss(logits.numpy(), labels, rule=rule)
    with pytest.raises(UserError, match=r"^ref_loss must be a torch.Tensor, got list"):
        selective_loss(logits, labels, torch.rand(2, 6).tolist())
    with pytest.raises(UserError, match=r"^rule must be a selective_lm.Selection, got str"):
        selective_loss(logits, labels, None, "topk")
    assert torch.isfinite(selective_loss(logits, labels, rule=rule).mean())  # tensors still work


def test_bad_input_raises_the_cli_messages(smoke_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for override, kwargs in (("train.ratio=1.5", {"ratio": 1.5}), ("train.scope=rows", {"scope": "rows"}),
                             ("train.rule=threshold", {"rule": "threshold"})):
        capsys.readouterr()
        assert slm("train", smoke_out, "train.method=topk", override) == 2
        cli = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("slm: error: ")
        with pytest.raises(UserError) as err:
            Selection(**kwargs)
        assert str(err.value) == cli
    with pytest.raises(UserError, match="not a token selection"):  # it would silently be CLM here
        Selection(method="distill")
    assert Selection(method="bottomk", ratio=0.5).rule_used == ("bottomk", "excess", 0.5, None)
    labels = torch.randint(0, 5, (2, 6))
    with pytest.raises(UserError, match=r"ref_loss has shape \(2, 5\), the labels \(2, 6\)"):
        selective_loss(torch.randn(2, 6, 5), labels, torch.rand(2, 5))
    with pytest.raises(UserError, match="reads reference losses but none were given"):
        selective_loss(torch.randn(2, 6, 5), labels)
    with pytest.raises(UserError, match="partial"):
        selective_loss(torch.randn(2, 6, 5), labels, torch.full((2, 6), torch.nan))
    with pytest.raises(UserError, match="row 1: ref_loss has 2 values, input_ids 3"):
        SelectiveCollator()([{"input_ids": [1, 2], "ref_loss": [0.0, 1.0]},
                             {"input_ids": [1, 2, 3], "ref_loss": [0.0, 1.0]}])


def test_score_refuses_other_tokenizers_and_existing_columns() -> None:
    import datasets

    cfg = load_config("smoke")
    model = load_model(cfg.model)
    n = model.get_input_embeddings().num_embeddings
    with pytest.raises(UserError, match=f"token id {n + 5} is beyond the reference's {n} embeddings"):
        score(model, datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, n + 5]]}))
    with pytest.raises(UserError, match="already has a 'ref_loss' column"):
        score(model, datasets.Dataset.from_dict({"input_ids": [[1, 2]], "ref_loss": [[0.0, 0.0]]}))
    with pytest.raises(UserError, match="no input_ids column"):
        score(model, datasets.Dataset.from_dict({"text": ["a"]}))


# ---------------------------------------------------------------------------- score


def test_score_equals_slm_score_and_resumes(smoke_out: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from selective_lm.store import frozen

    cfg = load_config("smoke")
    store = load_store(smoke_out / "data" / "train")
    stored = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")
    ds = datasets.Dataset.from_dict({"input_ids": np.asarray(store.tokens).tolist()})
    reference = load_reference_model(cfg, smoke_out)
    bs = cfg.scoring.batch_size
    got = np.array(score(reference, ds, batch_size=bs)["ref_loss"], dtype=np.float32)
    np.testing.assert_array_equal(got, stored)  # the same batches through the same function: bit-identical

    calls = {"n": 0}
    real = frozen.model_token_losses

    def killed_after_two(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, "model_token_losses", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        score(reference, ds, batch_size=bs, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(frozen, "model_token_losses", real)
    counted = {"n": 0}

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, "model_token_losses", counting)
    resumed = score(reference, ds, batch_size=bs, cache_dir=tmp_path / "cache")
    n_batches = -(-len(ds) // bs)
    assert counted["n"] == n_batches - 2  # the two finished batches were kept
    np.testing.assert_array_equal(np.array(resumed["ref_loss"], dtype=np.float32), stored)
    again = score(reference, ds, batch_size=bs, cache_dir=tmp_path / "cache")  # finished: read back
    assert counted["n"] == n_batches - 2
    np.testing.assert_array_equal(np.array(again["ref_loss"], dtype=np.float32), stored)
    # rows of different lengths: each gets its own length, NaN first
    ragged = datasets.Dataset.from_dict({"input_ids": [store.tokens[0][:5].tolist(), store.tokens[1].tolist()]})
    col = score(reference, ragged, batch_size=2)["ref_loss"]
    assert [len(c) for c in col] == [5, store.block_len] and np.isnan(col[0][0])
    np.testing.assert_allclose(col[1], stored[1], atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(col[0], stored[0][:5], atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------- SelectiveTrainer = slm train

STEP = ("train.steps=1", "train.grad_accum=2", "train.warmup_steps=0", "eval.every=0", "train.snapshot_every=0",
        "train.checkpoint_every=0")
CASES = {
    "topk": (("train.method=topk", "train.ratio=0.5"), Selection(method="topk", ratio=0.5)),
    "threshold": (("train.method=topk", "train.rule=threshold", "train.threshold=0.05"),
                  Selection(method="topk", rule="threshold", threshold=0.05)),
    "random": (("train.method=random", "train.ratio=0.3", "train.common_random=true", "train.scope=sequence"),
               Selection(method="random", ratio=0.3, scope="sequence")),
}


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A prompt/response store (prompts of uneven lengths, never trained), referenced and scored: micro-batches
    then differ in their trained counts, so a per-micro-batch mean would differ from the step's mean."""
    tmp = tmp_path_factory.mktemp("api-sft")

    def pairs(n: int, offset: int) -> Path:
        path = tmp / f"{offset}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Question {i}: " + "why? " * (i % 7),
                                            "response": f"Because {i} + {i} = {2 * i}."}) + "\n"
                                for i in range(offset, offset + n)))
        return path

    sources = {"train": pairs(120, 0), "reference": pairs(60, 200), "val": pairs(20, 400)}
    srcs = ", ".join(f"{k}: '{v}'" for k, v in sources.items())
    overrides = ["data.corpus=custom", f"data.sources={{{srcs}}}", "data.format=prompt_response",
                 "data.noise_rate=0", "data.max_tokens=null", "eval.splits=[val]"]
    out = tmp / "out"
    for command in ("prepare", "reference", "score"):
        assert slm(command, out, *overrides) == 0, command
    return out, overrides


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_selective_trainer_step_equals_slm_train(case: str, sft: tuple[Path, list[str]], tmp_path: Path) -> None:
    """One optimizer step with gradient accumulation 2: the same loss, gradient norm and updated LoRA weights."""
    import datasets
    from peft import get_peft_model_state_dict
    from transformers import TrainingArguments

    smoke_out, data = sft
    overrides, selection = CASES[case]
    overrides = (*data, *overrides)
    assert slm("train", smoke_out, *STEP, *overrides, f"train.name={case}") == 0
    run = smoke_out / "runs" / case
    ours = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    cfg = load_config("smoke", overrides=[*STEP, *overrides])
    t = cfg.train
    store = load_store(smoke_out / "data" / "train")
    rows = BlockOrder(store.n_blocks, t.seed).blocks(0, t.batch_size * t.grad_accum)
    ref = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")[rows]
    ids = np.asarray(store.tokens[rows])
    labels = np.where(store.targets(rows, doc_boundaries=False), ids, -100)  # -100 on the prompts
    counts = [int((labels[i : i + t.batch_size, 1:] != -100).sum()) for i in (0, t.batch_size)]
    assert counts[0] != counts[1]
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "ref_loss": ref.tolist()})
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, vocab_size=len(tokenizer))
    torch.manual_seed(t.seed)  # slm train seeds LoRA's init with train.seed
    model = apply_lora(model, cfg.model)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=t.batch_size,
                             gradient_accumulation_steps=t.grad_accum, max_steps=1, learning_rate=t.lr,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=t.max_grad_norm,
                             seed=t.seed, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             train_sampling_strategy="sequential", optim="adamw_torch")
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=ds, selection=selection)
    trainer.train()
    logged = trainer.state.log_history[0]
    # Another framework's order of sums: each figure within its float noise (helpers/runs.py), the gradient's
    # scale too (Adam would hide a mis-scaled gradient, the logged pre-clip norm does not).
    assert_same_logs([ours], [{"step": 1, **logged}])
    want = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    got = get_peft_model_state_dict(model)
    assert set(got) == set(want)
    base_model = load_model(cfg.model, vocab_size=len(tokenizer))
    torch.manual_seed(t.seed)  # the same LoRA init as both runs': an A that no step moves then adds no update
    base = get_peft_model_state_dict(apply_lora(base_model, cfg.model))
    # One AdamW step of another framework's order of sums (the helper also refuses two untouched inits).
    assert_same_updates({n: w.detach().cpu() for n, w in got.items()}, want, base, [t.lr])


@pytest.mark.slow
def test_selective_trainer_online_reference_equals_the_column(smoke_out: Path, tmp_path: Path) -> None:
    """A reference model scoring each batch gives the step that its offline column gives; eval is plain CE."""
    import datasets
    from transformers import TrainingArguments

    cfg = load_config("smoke")
    store = load_store(smoke_out / "data" / "train")
    reference = load_reference_model(cfg, smoke_out)
    ids = np.asarray(store.tokens[:8]).tolist()
    column = score(reference, datasets.Dataset.from_dict({"input_ids": ids}), batch_size=4)
    losses = []
    for ds, ref_model in ((column, None), (datasets.Dataset.from_dict({"input_ids": ids}), reference)):
        torch.manual_seed(0)
        model = apply_lora(load_model(cfg.model), cfg.model)
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-2, use_cpu=True,
                                 report_to=[], save_strategy="no", logging_steps=1,
                                 train_sampling_strategy="sequential")
        trainer = SelectiveTrainer(model=model, args=args, train_dataset=ds, eval_dataset=column,
                                   selection=Selection(ratio=0.5), reference_model=ref_model)
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
        assert np.isfinite(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    other = load_model(cfg.model.model_copy(update={"name": "random:tiny-llama"}), vocab_size=400)
    with pytest.raises(UserError, match="reference and student must share the tokenizer"):
        SelectiveTrainer(model=load_model(cfg.model), args=args, train_dataset=column, reference_model=other)
    foreign = column.map(lambda row: {"input_ids": [row["input_ids"][0], 399, *row["input_ids"][2:]]})
    with pytest.raises(UserError, match="token id 399 is beyond the model's 257 embeddings"):
        SelectiveTrainer(model=load_model(cfg.model), args=args, train_dataset=foreign).train()


# ---------------------------------------------------------------------------- TRL


@pytest.mark.slow
def test_sft_recipe_selects_completion_tokens_only(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig

    from selective_lm import selective_sft_trainer

    cfg = load_config("smoke")
    tokenizer = load_tokenizer(cfg.model)
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f" The answer is {2 * i}."}
            for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                     logging_steps=1)
    trainer = selective_sft_trainer(model=apply_lora(load_model(cfg.model), cfg.model), args=args,
                                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                    selection=Selection(method="topk", ratio=0.5, score="loss"))
    prepared = trainer.train_dataset
    completion = [sum(label != -100 for label in row) for row in prepared["labels"]]
    assert all(0 < c < len(ids) for c, ids in zip(completion, prepared["input_ids"], strict=True))  # prompt: -100
    trainer.train()
    logged = trainer.state.log_history[0]
    assert np.isfinite(logged["loss"])
    # half of the completion tokens that have a target, per micro-batch of 4 rows (round half up)
    n_valid = [sum(completion[i : i + 4]) for i in (0, 4)]
    expected = sum(int(np.floor(n * 0.5 + 0.5)) for n in n_valid) / sum(n_valid)
    assert logged["selected_frac"] == pytest.approx(expected)
    with pytest.raises(UserError, match="reference_model"):
        selective_sft_trainer(model=load_model(cfg.model), args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer, selection=Selection(ratio=0.5))


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.slow
def test_sft_recipe_trains_only_the_assistant_turns_of_conversations(tmp_path: Path) -> None:
    """`{"messages": [...]}` rows: labels -100 on every token outside the assistant turns (TRL alone trains all of
    them), counted byte by byte against the rendered template; the ids are TRL's own tokenization of the chat."""
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig

    from selective_lm import selective_sft_trainer

    cfg = load_config("smoke")
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [{"messages": [{"role": "system", "content": "Réponds brièvement."},
                          {"role": "user", "content": f"Combien font {i} × 2 ?"},
                          {"role": "assistant", "content": f"{2 * i}."},
                          {"role": "user", "content": "Et fois trois ?"},
                          {"role": "assistant", "content": f"{3 * i}, évidemment."}]} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                     logging_steps=1)
    trainer = selective_sft_trainer(model=apply_lora(load_model(cfg.model), cfg.model), args=args,
                                    train_dataset=datasets.Dataset.from_list(rows),
                                    eval_dataset={"val": datasets.Dataset.from_list(rows[:2])},
                                    processing_class=tokenizer, selection=Selection(method="topk", ratio=0.5,
                                                                                    score="loss"))
    prepared = trainer.train_dataset
    trained = []
    for row, ids, labels in zip(rows, prepared["input_ids"], prepared["labels"], strict=True):
        pieces = [(f"<|{m['role']}|>\n", False) for m in row["messages"]]
        pieces = [p for m, head in zip(row["messages"], pieces, strict=True)
                  for p in (head, (f"{m['content']}\n", m["role"] == "assistant"))]
        assert "".join(text for text, _ in pieces) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert ids == tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        expected = [flag for text, flag in pieces for _ in text.encode("utf-8")]  # byte tokenizer: a token per byte
        assert len(ids) == len(labels) == len(expected)
        assert labels == [i if flag else -100 for i, flag in zip(ids, expected, strict=True)]
        trained.append(sum(expected))
        assert 0 < trained[-1] < len(ids) / 3  # e.g. 20 of 93: what TRL alone would train in full
    val = trainer.eval_dataset["val"]
    assert val["labels"] == prepared["labels"][:2]
    trainer.train()
    logged = trainer.state.log_history[0]
    n_valid = [sum(trained[i:i + 4]) for i in (0, 4)]  # position 0 is a header token: never trained anyway
    assert logged["selected_frac"] == pytest.approx(sum(int(np.floor(n * 0.5 + 0.5)) for n in n_valid)
                                                    / sum(n_valid))
    without = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    with pytest.raises(UserError, match="conversation 0 has no assistant turn to train"):
        selective_sft_trainer(model=load_model(cfg.model), args=args, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_list(without),
                              selection=Selection(method="topk", ratio=0.5, score="loss"))
    with pytest.raises(UserError, match="^SFTConfig.chat_template_path: .* set tokenizer.chat_template"):
        selective_sft_trainer(model=load_model(cfg.model), processing_class=tokenizer,
                              args=SFTConfig(output_dir=str(tmp_path / "t"), chat_template_path=str(tmp_path / "t.j2"),
                                             use_cpu=True, report_to=[]),
                              train_dataset=datasets.Dataset.from_list(rows),
                              selection=Selection(method="topk", ratio=0.5, score="loss"))
    with pytest.raises(UserError, match="pass processing_class="):
        selective_sft_trainer(model=load_model(cfg.model), args=args, train_dataset=datasets.Dataset.from_list(rows),
                              selection=Selection(method="topk", ratio=0.5, score="loss"))
