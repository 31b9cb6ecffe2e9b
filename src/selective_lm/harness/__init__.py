"""Downstream tasks (`eval.tasks`) through lm-evaluation-harness, on the evaluated model in memory.

Rho-1's claims are few-shot accuracies, not perplexity: `slm eval` (and so `slm run`) hands the model it
has just loaded — a run with its LoRA adapter merged, `base` or `reference` — to lm-eval's Python API
(`HFLM(pretrained=<model>)` + `simple_evaluate`); nothing is re-downloaded or copied. Tasks are found in the
package's own `tasks/` (the offline `champ_answer`), then in `eval.task_paths`, then among lm-eval's tasks
(whose datasets come from the Hub). lm-eval and math-verify are the optional extra
`pip install 'selective-lm[eval]'`.

Results go to the model's `tasks.json`, one entry per task named in `eval.tasks`, each with the fingerprint
it was made for: the model (run config hash / reference digest / base model name), the task name,
`eval.num_fewshot`, `eval.limit`, the files in the directory of the task's YAML, the run's data settings
(tasks read them as metadata: champ_answer draws its problems by them) and the lm-eval and math-verify
versions. A task whose fingerprint matches is not run again; tasks.json of another model is replaced.
Metric names are lm-eval's, its filter appended after a comma unless it is `none`
(`acc`, `acc_stderr`; `exact_match,strict-match`, `exact_match,strict-match_stderr`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError, did_you_mean
from ..files import file_digest, fingerprint, read_json, write_json
from ..store.layout import RunDir

PACKAGE_TASKS = Path(__file__).parent / "tasks"
DATA_METADATA = "selective_lm_data"  # the task metadata key holding the run's data settings
INSTALL = "pip install 'selective-lm[eval]'"
EXTRA = ("lm_eval", "math_verify")

Metrics = dict[str, float | None]


def require_extra() -> None:
    """UserError naming the install command when lm-eval or math-verify cannot be imported."""
    for module in EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"eval.tasks needs lm-evaluation-harness and math-verify, and {module} cannot be "
                            f"imported: {INSTALL}") from None


def _include_paths(cfg: Config) -> list[Path]:
    paths = [PACKAGE_TASKS]
    for p in cfg.eval.task_paths:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise UserError(f"eval.task_paths: {p} is not a directory of lm-eval task YAML files")
        paths.append(path)
    return paths


def _files_digest(folder: Path) -> str:
    """Every file under `folder` (YAML, its !function modules, local data), by content."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and not p.name.startswith("."))
    return fingerprint([(str(p.relative_to(folder)), file_digest(p)) for p in files])


def _metrics(result: dict[str, Any]) -> Metrics:
    """lm-eval's `{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}` -> `{"acc": 0.5, "acc_stderr": 0.1}`
    (stderr None where lm-eval has none, e.g. "N/A" for one document)."""
    out: Metrics = {}
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if not filt:
            continue  # alias, sample counts
        base, stderr = metric.removesuffix("_stderr"), metric.endswith("_stderr")
        name = (base if filt == "none" else f"{base},{filt}") + ("_stderr" if stderr else "")
        out[name] = float(value) if isinstance(value, int | float) else None
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs every setting at INFO/WARNING (e.g. that `pretrained` is a model object): errors only. And
    its results record the git commit of the working directory, asking `git describe`, whose "fatal: not a git
    repository" outside one reached our stderr on every call: tasks.json has no use for it."""
    from unittest import mock

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None):
            yield
    finally:
        logger.setLevel(level)


def _stored(run: RunDir, digest: str) -> dict[str, Any]:
    """tasks.json's entries when they belong to the model `digest` names, else none."""
    if not run.tasks_path.is_file():
        return {}
    stored = read_json(run.tasks_path)
    return dict(stored.get("tasks") or {}) if stored.get("model") == digest else {}


def task_results(run: RunDir, digest: str) -> dict[str, Metrics]:
    """task -> metrics of every task stored for the model `digest` names (lm-eval's subtasks of a group
    included): what results.json lists under `runs[name].tasks`."""
    return {task: metrics for entry in _stored(run, digest).values() for task, metrics in entry["results"].items()}


@functools.lru_cache(maxsize=4)
def _with_lm_eval_tasks(paths: tuple[Path, ...], digests: tuple[str, ...], meta: str) -> Any:
    """A TaskManager that indexes lm-eval's own tasks too: its ~15k YAML files take seconds, so once per process
    for the same task folders (`digests`: their files, so that an edited folder is indexed again) and metadata
    (`slm run` checks the tasks, then loads them for each model it evaluates)."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=list(paths), metadata=json.loads(meta))


def _task_manager(cfg: Config, names: list[str], meta: dict[str, Any]) -> Any:
    """lm-eval's TaskManager over the package's tasks and eval.task_paths (and, when a name is not among those,
    lm-eval's own tasks); UserError naming the closest tasks for a name it does not know."""
    from lm_eval.tasks import TaskManager

    paths = _include_paths(cfg)
    with _quiet():
        manager = TaskManager(include_path=paths, include_defaults=False, metadata=meta)
    if any(n not in manager.all_tasks for n in names):  # only then: lm-eval's own tasks
        manager = _with_lm_eval_tasks(tuple(paths), tuple(_files_digest(p) for p in paths),
                                      json.dumps(meta, sort_keys=True))
    for name in names:
        if name not in manager.all_tasks:
            package = sorted(n for n, e in manager.task_index.items()
                             if e.yaml_path and e.yaml_path.is_relative_to(PACKAGE_TASKS))
            raise UserError(f"unknown task {name!r} in eval.tasks{did_you_mean(name, manager.all_tasks, n=5)} "
                            f"(this package's: {', '.join(package)}; then eval.task_paths, then lm-eval's own: "
                            "`lm-eval ls tasks`)")
    return manager


def check_tasks(cfg: Config) -> None:
    """UserError when lm-eval is missing or a task of eval.tasks does not resolve: what `slm run` checks before
    its first step (TaskEval checks again, and loads the tasks, before each evaluation)."""
    require_extra()
    _task_manager(cfg, list(cfg.eval.tasks), {DATA_METADATA: cfg.data.model_dump(mode="json")})


class TaskEval:
    """The tasks of `eval.tasks` for one evaluated model: checked and loaded on construction (so that bad
    input fails before any evaluation), run by `run`."""

    def __init__(self, cfg: Config, run: RunDir, digest: str) -> None:
        require_extra()
        from lm_eval.tasks import TaskManager

        self.cfg, self.run_dir, self.digest = cfg, run, digest
        paths = _include_paths(cfg)
        self.metadata = {DATA_METADATA: cfg.data.model_dump(mode="json")}
        with _quiet():
            self.manager = TaskManager(include_path=paths, include_defaults=False, metadata=self.metadata)
        versions = {m: metadata.version(m) for m in EXTRA}
        self.fingerprints = {name: fingerprint(digest, name, cfg.eval.num_fewshot, cfg.eval.limit, self._files(name),
                                               self.metadata, versions) for name in cfg.eval.tasks}
        self.stored = _stored(run, digest)
        self.pending = [n for n in cfg.eval.tasks
                        if (self.stored.get(n) or {}).get("fingerprint") != self.fingerprints[n]]
        if any(n not in self.manager.all_tasks for n in self.pending):
            self.manager = _task_manager(cfg, self.pending, self.metadata)
        self.loaded = {name: self._load(name) for name in self.pending}

    def _files(self, name: str) -> str | None:
        """The digest of the local task's directory; None for lm-eval's own (its version covers them)."""
        entry = self.manager.task_index.get(name)
        return _files_digest(entry.yaml_path.parent) if entry is not None and entry.yaml_path else None

    def _load(self, name: str) -> list[Any]:
        """The task (or group, or a tag's tasks) with its documents: a broken YAML or a dataset that cannot be
        fetched (offline) is the user's to fix, so it becomes one line."""
        try:
            with _quiet():
                loaded = self.manager.load([name])
        except Exception as e:  # any failure of a user's task config or its dataset
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"task {name!r} cannot be loaded: {type(e).__name__}: {first}") from None
        if name in loaded.get("groups", {}):
            return [loaded["groups"][name]]
        return [loaded["tasks"][name]] if name in loaded["tasks"] else list(loaded["tasks"].values())

    def run(self, model: Callable[[], Any], tokenizer: Callable[[], Any]) -> dict[str, Metrics]:
        """Run the tasks tasks.json does not hold (writing it after each); task -> metrics of `eval.tasks`. The model
        and tokenizer come from callables, called only when a task is pending."""
        if self.pending:
            import torch
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM

            cuda = torch.cuda.is_available()
            lm_model = model().to("cuda" if cuda else "cpu")
            size = self.cfg.eval.batch_size  # auto: lm-eval's own probe on CUDA, the CPU default (8) on CPU
            with _quiet():
                lm = HFLM(pretrained=lm_model, tokenizer=tokenizer(),
                          batch_size=8 if size == "auto" and not cuda else size)
            for name in self.pending:
                start = time.perf_counter()
                with _quiet():
                    out = simple_evaluate(model=lm, tasks=self.loaded[name], num_fewshot=self.cfg.eval.num_fewshot,
                                          limit=self.cfg.eval.limit, task_manager=self.manager, log_samples=False)
                self.stored[name] = {
                    "fingerprint": self.fingerprints[name], "num_fewshot": self.cfg.eval.num_fewshot,
                    "limit": self.cfg.eval.limit, "seconds": round(time.perf_counter() - start, 1),
                    "n_shot": out.get("n-shot", {}),
                    "samples": {t: n.get("effective") for t, n in out.get("n-samples", {}).items()},
                    "results": {t: _metrics(r) for t, r in out["results"].items()}}
                write_json(self.run_dir.tasks_path, {"model": self.digest, "tasks": self.stored})
        return {task: metrics for name in self.cfg.eval.tasks
                for task, metrics in self.stored[name]["results"].items()}
