"""Downstream tasks (`eval.tasks`): local tasks through the real lm-eval API on the tiny model, the cache in
tasks.json, results.json and the report, the embedded champ_answer task, and bad input (exit 2, one line)."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

from selective_lm.analyze import analyze
from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.evaluate import evaluate, model_digest
from selective_lm.files import read_json
from selective_lm.harness import DATA_METADATA, PACKAGE_TASKS, TaskEval, task_results
from selective_lm.store.layout import OutDir

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")

GEN_DOCS = [{"question": f"{a} + {b} =", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
MC_DOCS = [{"question": f"Is {n} even?", "label": n % 2} for n in range(4)]


def write_tasks(folder: Path) -> Path:
    """A generate_until task (`tiny_gen`) and a multiple_choice task (`tiny_mc`), YAML + JSONL in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("tiny_gen", GEN_DOCS), ("tiny_mc", MC_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ntest_split: train\ndataset_kwargs:\n  data_files: {train: %s}\n"
    (folder / "tiny_gen.yaml").write_text("task: tiny_gen\n" + head % (folder / "tiny_gen.jsonl") + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "Q: {{question}}\\nA:"
        doc_to_target: "{{answer}}"
        generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 4}
        metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
        """))
    (folder / "tiny_mc.yaml").write_text("task: tiny_mc\n" + head % (folder / "tiny_mc.jsonl") + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: ["yes", "no"]
        doc_to_target: "{{label}}"
        metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
        """))
    return folder


def task_overrides(folder: Path, tasks: str = "[tiny_gen, tiny_mc]", limit: int = 3) -> list[str]:
    return [f"eval.tasks={tasks}", f"eval.task_paths=[{folder}]", f"eval.limit={limit}"]


def test_local_generation_and_multiple_choice_tasks_run_once(smoke_out: Path, tmp_path: Path, one_thread) -> None:
    folder = write_tasks(tmp_path / "tasks")
    cfg = load_config("smoke", overrides=["train.name=base", *task_overrides(folder)])
    result = evaluate(cfg, smoke_out)
    assert {task: set(metrics) for task, metrics in result["tasks"].items()} == {
        "tiny_gen": {"exact_match", "exact_match_stderr"}, "tiny_mc": {"acc", "acc_stderr"}}
    assert 0 <= result["tasks"]["tiny_mc"]["acc"] <= 1 and result["tasks"]["tiny_mc"]["acc_stderr"] >= 0
    assert read_json(smoke_out / "base" / "eval.json") == {k: v for k, v in result.items() if k != "tasks"}

    run = OutDir(smoke_out).run("base")
    stored = read_json(run.tasks_path)
    assert stored["model"] == model_digest(cfg, run)
    assert sorted(stored["tasks"]) == ["tiny_gen", "tiny_mc"]
    assert stored["tasks"]["tiny_gen"]["samples"] == {"tiny_gen": 3} and stored["tasks"]["tiny_mc"]["limit"] == 3
    assert {t: e["results"][t] for t, e in stored["tasks"].items()} == result["tasks"]
    assert analyze(cfg, smoke_out)["runs"]["base"]["tasks"] == result["tasks"]  # results.json
    assert task_results(run, "another model") == {}  # tasks.json of a model since replaced is not reported

    before = run.tasks_path.stat().st_mtime_ns  # the same request again: nothing to run, nothing rewritten
    assert TaskEval(cfg, run, model_digest(cfg, run)).pending == []
    assert evaluate(cfg, smoke_out)["tasks"] == result["tasks"]
    assert run.tasks_path.stat().st_mtime_ns == before

    # Another limit, or an edited task file, re-runs only that task; other entries stay.
    more = load_config("smoke", overrides=["train.name=base", *task_overrides(folder, "[tiny_mc]", limit=4)])
    assert TaskEval(more, run, model_digest(more, run)).pending == ["tiny_mc"]
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS[::-1]))
    assert TaskEval(cfg, run, model_digest(cfg, run)).pending == ["tiny_gen", "tiny_mc"]


@pytest.mark.slow
def test_slm_run_evaluates_tasks_of_every_model_into_results_and_report(smoke_out: Path, tmp_path: Path,
                                                                         one_thread) -> None:
    folder = write_tasks(tmp_path / "tasks")
    args = ["run", "--preset", "smoke", "--out", str(smoke_out), "grid.methods=[topk]", "grid.ratios=[0.5]",
            "grid.oracle=false", *task_overrides(folder, "[tiny_mc]", limit=2)]
    assert main(args) == 0
    results = read_json(smoke_out / "results.json")
    assert sorted(results["runs"]) == ["base", "clm", "reference", "topk-r0.5"]
    for name, entry in results["runs"].items():
        assert set(entry["tasks"]) == {"tiny_mc"} and set(entry["tasks"]["tiny_mc"]) == {"acc", "acc_stderr"}, name
        tasks_json = read_json(OutDir(smoke_out).run(name).tasks_path)
        assert tasks_json["tasks"]["tiny_mc"]["results"] == entry["tasks"], name
    report = (smoke_out / "report.md").read_text()
    section = report.split("## Downstream tasks")[1].split("\n## ")[0]
    assert "### `tiny_mc`" in section and "Δ acc vs CLM" in section
    for name in ("base", "reference", "clm", "topk-r0.5"):
        assert f"| `{name}` |" in section


def test_missing_extra_exits_2_before_evaluating(smoke_out: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code = main(["eval", "--preset", "smoke", "--out", str(smoke_out), "--tasks", "champ_answer", "train.name=base"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "pip install 'selective-lm[eval]'" in err
    assert not (smoke_out / "base").exists()  # neither eval.json nor tasks.json


@pytest.mark.slow  # an unknown name is looked up among lm-eval's ~15k tasks too: seconds to index them
def test_unknown_task_names_close_ones(smoke_out: Path, capsys) -> None:
    command = ["eval", "--preset", "smoke", "--out", str(smoke_out)]
    assert main([*command, "--tasks", "champ_anwser", "train.name=base"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'champ_anwser'" in err and "did you mean 'champ_answer'" in err
    assert main([*command, "train.name=base", "eval.tasks=[gsm8k_cott]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'gsm8k_cot', " in err and " or " in err  # closest first
    assert not (smoke_out / "base").exists()


def test_bad_task_paths_and_broken_task_files_exit_2(smoke_out: Path, tmp_path: Path, capsys) -> None:
    eval_base = ["eval", "--preset", "smoke", "--out", str(smoke_out), "train.name=base"]
    assert main([*eval_base, "eval.tasks=[tiny_mc]", f"eval.task_paths=[{tmp_path / 'none'}]"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    folder = write_tasks(tmp_path / "tasks")
    (folder / "tiny_mc.jsonl").unlink()  # its data file is gone
    assert main([*eval_base, *task_overrides(folder, "[tiny_mc]")]) == 2
    err = capsys.readouterr().err
    assert "task 'tiny_mc' cannot be loaded" in err and err.count("\n") == 1
    assert main([*eval_base, "eval.tasks=[champ_answer, champ_answer]"]) == 2
    assert "named twice" in capsys.readouterr().err
    assert not (smoke_out / "base" / "tasks.json").exists()


# --------------------------------------------------------------------------- champ_answer


def _champ_task(data: dict) -> object:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(PACKAGE_TASKS), include_defaults=False, metadata={DATA_METADATA: data})
    return manager.load(["champ_answer"])["tasks"]["champ_answer"]


@pytest.mark.parametrize("overrides", [[], ["data.seed=3", "data.val_fraction=0.2"]])
def test_champ_answer_documents_are_the_val_problems_and_exemplars_train_problems(overrides: list[str]) -> None:
    from selective_lm.data.corpora.champ import champ_partition

    cfg = load_config("champ-smollm2", overrides=overrides)
    part = champ_partition(cfg.data)
    task = _champ_task(cfg.data.model_dump(mode="json"))
    assert sorted(d["id"] for d in task.eval_docs) == part.val_problems
    exemplars = {d["id"] for d in task.fewshot_docs()}
    assert len(exemplars) > 100 and exemplars <= set(part.train_problems)
    assert task.config.num_fewshot == 4 and task.config.generation_kwargs["max_gen_toks"] <= 256
    prompt = task.fewshot_context(task.eval_docs[0], num_fewshot=4)
    assert prompt.count("Problem: ") == 5 and prompt.endswith("Answer:")


def test_champ_answer_checks_answers_with_math_verify() -> None:
    from selective_lm.data.corpora.champ import champ_partition, load_champ

    spec = importlib.util.spec_from_file_location("champ_answer_utils", PACKAGE_TASKS / "champ_answer" / "utils.py")
    champ = importlib.util.module_from_spec(spec)  # the task's own module, loaded from its file as lm-eval does
    spec.loader.exec_module(champ)
    problems = load_champ()["problems"]
    for pid in champ_partition(load_config("champ-smollm2").data).val_problems:  # every answer is its own answer
        p = problems[pid]
        assert champ.is_correct(p["_raw_answer"], p["_answer"], p["_answer"]), p["_answer"]
        assert not champ.is_correct(p["_raw_answer"], p["_answer"], "12345")
    cases = [  # (raw answer, answer, prediction, correct?)
        ("@@(n+1)/(r+1)@@", "(n+1)/(r+1)", " \\frac{n+1}{r+1}", True),
        ("@@2^n@@", "2^n", "2^{n}.", True),
        ("@@2^n@@", "2^n", "2", False),
        ("@@2^floor(n/2)*floor(n/2)!@@", "2^floor(n/2)*floor(n/2)!", "2", False),  # not a partial reading
        ("@@1/n@@", "1/n", "The answer is 1/n", True),
        ("@@1/n@@", "1/n", "1", False),
        ("0 is the only possible value", "0 is the only possible value", "0", True),
        ("The limit exists and is equal to @@2/3@@", "The limit exists and is equal to 2/3", "It is 4/6.", True),
        ("@@C(n, 4)@@, or an equivalent form such as @@n(n-1)(n-2)(n-3)/4!@@", "", "n(n-1)(n-2)(n-3)/24", True),
        ("No", "No", "No, it is not possible.", True),
        ("Yes", "Yes", "No", False),
        ("376 and 625", "376 and 625", "625", False),  # both numbers make the answer
        ("@@[-1, 1]@@", "[-1, 1]", "[-1,1]", True),
    ]
    for raw, answer, prediction, correct in cases:
        assert champ.is_correct(raw, answer or raw.replace("@@", ""), prediction) is correct, (raw, prediction)


@pytest.mark.slow
def test_champ_answer_runs_on_the_tiny_model(smoke_out: Path, one_thread) -> None:
    cfg = load_config("smoke", overrides=["train.name=reference", "eval.tasks=[champ_answer]", "eval.limit=2"])
    result = evaluate(cfg, smoke_out)
    assert set(result["tasks"]["champ_answer"]) == {"acc", "acc_stderr"}
    stored = read_json(smoke_out / "reference" / "tasks.json")["tasks"]["champ_answer"]
    assert stored["samples"] == {"champ_answer": 2} and stored["n_shot"] == {"champ_answer": 4}


def test_champ_answer_targets_stay_text() -> None:
    """An answer that looks like a Python list ("[-1, 1]") stays the answer's text: lm-eval literal_evals a
    rendered template that does, and a few-shot prompt holding the resulting list of ints raised."""
    task = _champ_task(load_config("champ-smollm2").data.model_dump(mode="json"))
    doc = {**task.eval_docs[0], "answer": "[-1, 1]"}
    assert task.doc_to_target(doc) == "[-1, 1]"
