"""No silent damage: out dirs that remember their config, no silent deletion, every input checked before work.

One test (or a few) per item of the issue, each failing on the code before it: a forgotten --preset that
overwrote eval.json, `slm run` deleting another config's run, late split checks, a process count outside
the run's identity, options without effect, silent bad rows, noise and caps the user did not ask for, a
half-written prepare.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.errors import UserError

FAST = ["train.steps=3", "eval.every=0", "train.snapshot_every=0", "train.checkpoint_every=0", "grid.methods=[topk]",
        "grid.ratios=[0.5]", "grid.oracle=false"]


def _slm(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- 1. the out dir remembers its config


def test_forgotten_preset_uses_the_stored_config_and_a_conflict_exits_2(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert _slm(capsys, "prepare", "--preset", "smoke", "--out", out)[0] == 0
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert _slm(capsys, "eval", "--preset", "smoke", "--out", out, "train.name=base")[0] == 0
    eval_json = tmp_path / "out" / "base" / "eval.json"
    first = eval_json.read_text()
    # The slip of the issue: no --preset. It used to evaluate the default model on the smoke store (252.9 -> 5415.8).
    assert _slm(capsys, "eval", "--out", out, "train.name=base")[0] == 0
    assert eval_json.read_text() == first
    before = _files(tmp_path / "out")
    code, err = _slm(capsys, "eval", "--preset", "champ-smollm2", "--out", out, "train.name=base")
    assert code == 2 and "model.name" in err and "data.block_len" in err and len(err.splitlines()) == 1, err
    assert _files(tmp_path / "out") == before
    # Engine and run settings never conflict.
    assert _slm(capsys, "config", "--out", out, "train.steps=9", "train.parallel=fsdp")[0] == 0


def test_out_dir_without_stored_config_refuses_another_models_eval_then_stores_one(smoke_out: Path, capsys) -> None:
    """An out dir made before config.yaml existed: the default model is refused on the smoke store (it used to
    overwrite eval.json, or end in a traceback on a trained run); the next good command stores the config."""
    assert not (smoke_out / "config.yaml").exists()
    before = _files(smoke_out)
    code, err = _slm(capsys, "eval", "--out", str(smoke_out), "train.name=base")
    assert code == 2 and "tokenizer" in err and len(err.splitlines()) == 1, err
    assert _files(smoke_out) == before
    assert _slm(capsys, "eval", "--preset", "smoke", "--out", str(smoke_out), "train.name=base")[0] == 0
    assert load_config(base=__import__("yaml").safe_load((smoke_out / "config.yaml").read_text())).preset == "smoke"


def test_run_first_hints_work_as_printed(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "fresh")
    code, err = _slm(capsys, "train", "--preset", "smoke", "--out", out, "train.steps=1")
    assert code == 2 and not (tmp_path / "fresh" / "config.yaml").exists(), err
    hint = re.search(r"`(slm prepare[^`]*)`", err)
    assert hint and "--preset smoke" in hint.group(1) and f"--out {out}" in hint.group(1), err
    assert main(shlex.split(hint.group(1))[1:]) == 0
    assert (tmp_path / "fresh" / "data" / "train" / "meta.json").is_file()


# --------------------------------------------------------------------------- 2. no silent deletion


@pytest.mark.slow
def test_slm_run_never_deletes_a_finished_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _slm(capsys, "run", "--preset", "smoke", "--out", str(out), *FAST)[0] == 0
    runs = {n: (out / "runs" / n / "train.json").read_text() for n in ("clm", "topk-r0.5")}
    # The self-reference example of docs/rules.md in the same out dir (no --preset: the stored config): new names
    # for the selecting runs; CLM, which reads no score kind, stays the same run.
    assert _slm(capsys, "run", "--out", str(out), "reference.mode=ema", "reference.start_step=1",
                "train.score=retrospective")[0] == 0
    assert (out / "runs" / "topk-r0.5-retrospective-ema" / "train.json").is_file()
    assert {n: (out / "runs" / n / "train.json").read_text() for n in runs} == runs
    assert not (out / "stale").exists()
    # Another config under the same names: `slm train` refuses, `slm run` moves the old run aside.
    code, err = _slm(capsys, "train", "--out", str(out), "train.lr=0.02")
    assert code == 2 and "train.lr" in err and "train.name" in err, err
    code, err = _slm(capsys, "run", "--out", str(out), "train.lr=0.02")
    assert code == 0 and "moved it to" in err, err
    assert (out / "stale" / "runs" / "clm-1" / "train.json").read_text() == runs["clm"]
    assert (out / "runs" / "clm" / "train.json").read_text() != runs["clm"]


def test_run_names_carry_every_choice_that_changes_the_selection() -> None:
    def name(*overrides: str) -> str:
        return load_config("smoke", overrides=list(overrides)).run_name()

    assert name() == "clm" and name("train.method=topk", "train.ratio=0.5") == "topk-r0.5"  # the default study's
    selecting = ["train.method=topk", "train.ratio=0.5"]
    names = {name(*selecting, *extra) for extra in (
        (), ("train.score=loss",), ("train.scope=sequence",), ("train.soft=true",), ("train.common_random=true",),
        ("reference.mode=ema", "reference.start_step=2"), ("reference.mode=checkpoint", "reference.start_step=2"))}
    assert len(names) == 7
    assert name(*selecting, "reference.mode=ema", "reference.start_step=2", "train.score=retrospective") == \
        "topk-r0.5-retrospective-ema"
    assert name("reference.mode=ema", "reference.start_step=2") == "clm"  # CLM selects nothing: the same run
    assert name("train.method=random", "train.ratio=0.5", "train.score=loss") == "random-r0.5"  # reads no score


# --------------------------------------------------------------------------- 3. check before work


def _custom_corpus(tmp_path: Path, splits: tuple[str, ...]) -> list[str]:
    text = "We add the numbers one by one and check the sum twice before we write it down. " * 4
    return ["data.corpus=custom", *(f"data.sources.{s}={_jsonl(tmp_path / f'{s}.jsonl', [{'text': text}] * 30)}"
                                    for s in splits)]


@pytest.mark.parametrize(("splits", "extra", "needle"), [
    (("train",), [], "no held-out split"),
    (("train", "reference", "val_clean"), ["eval.splits=[val_clean,val_noisy]"], "val_noisy"),
    (("train", "val_clean"), [], "reference split"),
    (("train", "reference", "val_clean"), ["eval.tasks=[champ_anwser]"], "champ_anwser"),
])
def test_slm_run_checks_splits_and_tasks_before_any_work(tmp_path: Path, capsys, splits, extra, needle) -> None:
    out = tmp_path / "out"
    code, err = _slm(capsys, "run", "--preset", "smoke", "--out", str(out), *_custom_corpus(tmp_path, splits), *extra)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # not even an empty data/ or out dir (files.atomic_dir)


def test_custom_corpus_evaluates_on_the_splits_it_has(tmp_path: Path) -> None:
    cfg = load_config("smoke", overrides=_custom_corpus(tmp_path, ("train", "reference", "dev")))
    assert cfg.eval.splits == ["dev"] and cfg.analysis.bucket_split == "dev"


# --------------------------------------------------------------------------- 4. the process count is the run's


def test_a_run_of_another_process_count_is_not_returned_as_done(smoke_out: Path, smoke_cfg) -> None:
    from selective_lm.store.layout import OutDir
    from selective_lm.train import train
    from selective_lm.training.trainer import Trainer

    cfg = smoke_cfg.model_copy(update={"train": smoke_cfg.train.model_copy(update={"steps": 1})})
    summary = train(cfg, smoke_out)
    assert summary["processes"] == 1
    out = OutDir(smoke_out)
    trainer = Trainer(cfg, out, out.run("clm"))
    assert trainer.fit() == summary  # the same process count: done
    one = trainer._config_hash()
    trainer.world = 2  # what a 2-process launch sees: twice the tokens per step
    assert trainer._config_hash() != one
    with pytest.raises(UserError, match="another config"):
        trainer.fit()


# --------------------------------------------------------------------------- 5. no silently ignored option


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.method=topk", "train.threshold=0.5"], "train.rule=threshold"),
    (["train.method=topk", "train.rule=positive", "train.ratio=0.3"], "train.ratio"),
    (["train.method=topk", "train.rule=positive", "train.threshold=0.5"], "train.threshold"),
    (["reference.mode=ema", "reference.start_step=2", "scoring.dtype=float16"], "scoring.dtype"),
    (["reference.mode=ema", "reference.start_step=2", "reference.path=/some/model"], "reference.path"),
    (["reference.mode=checkpoint", "reference.start_step=2", "reference.ema_decay=0.9"], "reference.mode=ema"),
    (["data.sources.train=x.jsonl"], "data.corpus=custom"),
])
def test_an_option_without_effect_exits_2(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        load_config("smoke", overrides=overrides)


def test_preset_and_stored_values_are_no_ignored_options() -> None:
    """The smoke preset sets reference.steps, which a self-reference does not read: only the user's own choices
    count, and an out dir's stored config is no choice of this command's."""
    cfg = load_config("smoke", overrides=["reference.mode=ema", "reference.start_step=2"])
    stored = load_config("smoke", overrides=["grid.rules=[topk,threshold]", "train.threshold=0.25"]).to_dict()
    assert load_config(base=stored, overrides=["train.method=topk", "train.ratio=0.5"]).train.threshold == 0.25
    assert cfg.reference.steps == 4


def test_threshold_and_ratio_outside_their_rule_change_no_cache_key() -> None:
    base = load_config("smoke", overrides=["train.method=topk", "train.ratio=0.5"]).train
    assert base.model_copy(update={"threshold": 0.5}).hashed() == base.hashed()
    assert base.model_copy(update={"score": "loss"}).hashed() != base.hashed()  # top-k reads its score kind
    for method in ("clm", "oracle", "distill", "entropy_topk"):  # none, or one of their own
        train = load_config("smoke", overrides=[f"train.method={method}"]).train
        assert train.model_copy(update={"score": "retrospective"}).hashed() == train.hashed(), method
    cfg = load_config("smoke", overrides=["grid.rules=[positive]", "grid.methods=[topk]"])
    (positive,) = [c for n, c in cfg.grid_runs(has_noise=True).items() if n == "topk-pos"]
    assert positive.train.ratio == 1.0


# --------------------------------------------------------------------------- 6. bad SFT and chat rows


SFT = ["data.corpus=custom", "data.block_len=8", "data.max_tokens=null", "data.format=prompt_response"]


@pytest.mark.parametrize(("rows", "needle"), [
    ([{"prompt": "q", "response": "r"}, {"response": "r"}], "line 2: no 'prompt'"),
    ([{"prompt": "q", "response": "r"}, {"prompt": "q", "response": 3}], "line 2: a non-string 'response'"),
    ([{"prompt": "q", "response": ""}] * 3, "line 1: an empty 'response'"),
])
def test_bad_sft_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path: Path, capsys, rows, needle) -> None:
    src = _jsonl(tmp_path / "sft.jsonl", [*rows, *[{"prompt": "question", "response": "a long answer " * 4}] * 4])
    out = tmp_path / "out"
    code, err = _slm(capsys, "prepare", "--preset", "smoke", "--out", str(out), *SFT, f"data.sources.train={src}")
    assert code == 2 and needle in err and "sft.jsonl" in err and "data.bad_rows=skip" in err, err
    assert not (out / "data" / "train").exists()
    capsys.readouterr()
    assert main(["prepare", "--preset", "smoke", "--out", str(out), *SFT, f"data.sources.train={src}",
                 "data.bad_rows=skip"]) == 0
    bad = sum(1 for r in rows if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str)
              or not r["response"])
    assert json.loads(capsys.readouterr().out)["train"]["skipped_rows"] == bad
    assert json.loads((out / "data" / "train" / "meta.json").read_text())["skipped_rows"] == bad


@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
])
def test_chat_rows_without_a_trained_turn_exit_2(tmp_path: Path, messages, needle) -> None:
    from selective_lm.data.corpora import CORPORA

    src = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    cfg = load_config("smoke", overrides=["data.corpus=custom", "data.format=chat", f"data.sources.train={src}"])
    with pytest.raises(UserError, match=f"line 1: .*{needle}"):
        list(CORPORA["custom"](cfg.data)["train"].documents)


# --------------------------------------------------------------------------- 7. a user's corpus as asked


def test_custom_corpus_gets_no_noise_unless_asked_and_a_cap_says_what_it_kept(tmp_path: Path, capsys) -> None:
    from selective_lm.prepare import prepare

    src = _jsonl(tmp_path / "t.jsonl", [{"text": f"Document {i}: the sum of two odd numbers is even."}
                                        for i in range(200)])
    cfg = load_config("smoke", overrides=["data.corpus=custom", f"data.sources.train={src}", "data.max_tokens=2000"])
    assert cfg.data.noise_rate == 0
    capsys.readouterr()
    summary = prepare(cfg, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "data" / "train" / "meta.json").read_text())
    assert meta["noise"] is None and meta["capped"]
    assert 0 < meta["cap_kept_docs"] < 200 and summary["train"]["cap_kept_docs"] == meta["cap_kept_docs"]
    assert f"keeps the first {meta['cap_kept_docs']} documents" in capsys.readouterr().err
    noisy = load_config("smoke", overrides=["data.corpus=custom", f"data.sources.train={src}", "data.noise_rate=0.2"])
    assert noisy.data.noise_rate == 0.2


def test_the_smoke_caps_reach_a_custom_corpus_s_own_split(tmp_path: Path, capsys) -> None:
    """The smoke preset's `default` cap caps a custom corpus's `val` as CHAMP's val_clean (it went uncapped: 32.5k
    tokens where a smoke evaluation reads 4k), with no warning; per-split caps and a default are the same settings."""
    from selective_lm.prepare import prepare

    text = "Document {}: the sum of two odd numbers is even, and here is why, step by step."
    sources = {s: _jsonl(tmp_path / f"{s}.jsonl", [{"text": text.format(i)} for i in range(n)])
               for s, n in (("train", 300), ("reference", 150), ("val", 100))}
    cfg = load_config("smoke", overrides=["data.corpus=custom", *(f"data.sources.{s}={f}" for s, f in sources.items())])
    assert {s: cfg.data.cap(s) for s in ("train", "reference", "val", "val_clean")} == {
        "train": 16000, "reference": 8000, "val": 4000, "val_clean": 4000}
    capsys.readouterr()
    prepare(cfg, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "data" / "val" / "meta.json").read_text())
    assert meta["max_tokens"] == 4000 and meta["capped"] and meta["n_tokens"] <= 4000 + cfg.data.block_len
    assert "warning" not in capsys.readouterr().err
    old_style = load_config("smoke", overrides=["data.max_tokens={reference: 8000, train: 16000, val_clean: 4000, "
                                                "val_noisy: 4000}"])
    new_style = load_config("smoke")  # old smoke out dirs still fit it, and their runs keep their hashes:
    assert old_style.artifact_settings() == new_style.artifact_settings()
    assert old_style.data.hashed() == new_style.data.hashed() and old_style.data.hashed(mode="json") == \
        new_style.data.hashed(mode="json")


def test_a_cap_naming_a_split_the_corpus_lacks_is_a_warning(tmp_path: Path, capsys) -> None:
    """One line on stderr naming the cap that applies to nothing and the split left uncapped; prepare goes on."""
    sources = {s: _jsonl(tmp_path / f"{s}.jsonl", [{"text": f"Document {i} of {s}: the sum is even. " * 3}
                                                   for i in range(40)]) for s in ("train", "val")}
    code, err = _slm(capsys, "prepare", "--preset", "smoke", "--out", str(tmp_path / "out"), "data.corpus=custom",
                     *(f"data.sources.{s}={f}" for s, f in sources.items()),
                     "data.max_tokens={train: 2000, val_clean: 500}")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 1, err
    assert ("data.max_tokens caps val_clean, which data.corpus=custom does not have (its splits: train, val); "
            "val is not capped; name the corpus's splits, or cap every split not named with the key 'default'") \
        in warnings[0]
    meta = json.loads((tmp_path / "out" / "data" / "val" / "meta.json").read_text())
    assert meta["max_tokens"] is None and not meta["capped"]


# --------------------------------------------------------------------------- 8. a failed prepare leaves nothing


def test_failed_prepare_leaves_no_split_behind(tmp_path: Path, capsys) -> None:
    good = _jsonl(tmp_path / "ref.jsonl", [{"text": "clean text to learn from " * 8}] * 20)
    bad = _jsonl(tmp_path / "val.jsonl", [{"text": "fine " * 20}, {"body": "no text field here"}])
    out = tmp_path / "out"
    code, err = _slm(capsys, "prepare", "--preset", "smoke", "--out", str(out), "data.corpus=custom",
                     f"data.sources.train={good}", f"data.sources.reference={good}", f"data.sources.val_clean={bad}")
    assert code == 2 and "line 2" in err, err
    assert not out.exists()  # not even an empty data/ or out dir (files.atomic_dir)


def test_task_evaluation_prints_no_git_noise(tmp_path: Path, monkeypatch, capfd) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator

    from selective_lm.harness import _quiet

    monkeypatch.chdir(tmp_path)  # not a git repository
    with _quiet():
        assert evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
