"""`slm run`: the preset's comparison grid as cached, resumable stages; only wires the stages.

prepare → reference → score (once for all runs) → CLM, oracle and every method × ratio × seed
→ eval of every run, of the reference and of the base model → trajectory losses → analyze
(analysis.json, results.json) → report. Every stage is skipped when its outputs match the
config that produced them (token stores by config fingerprint, runs by `train.json`'s config
hash, scores and token losses by the fingerprints of their inputs, results by the fingerprint
of everything they are made of), so a second `slm run` does nothing and a changed ratio re-runs
only what depends on it. A killed run resumes from the last checkpoint of the stage it was in.

Under `accelerate launch --num_processes N -m selective_lm.cli run ...` every rank runs `run()`:
reference and training run data-parallel and scoring sharded on all of them; the out-dir lock,
prepare, evaluation, analysis and report belong to the main process (the others wait for
prepare and stop after the last training run), which alone returns the summary.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .analyze import analyze
from .config import Config
from .data.corpora import CORPORA
from .errors import UserError
from .evaluate import evaluate, evaluate_trajectory
from .files import read_json
from .harness import check_tasks
from .prepare import prepare
from .reference import reference
from .report import report
from .scoring import score
from .store import outconfig
from .store.frozen import Ranks, ranks
from .store.layout import OutDir
from .train import train
from .training.models import load_reference_model


@dataclass(frozen=True)
class Task:
    """One unit of the overall progress display; `cost` (in tokens processed) sizes the ETA."""

    label: str
    cost: float


def run(cfg: Config, out: str | Path | OutDir) -> dict[str, Any] | None:
    """Run (or resume, or confirm) the whole experiment under `out`; returns a short summary (main process)."""
    out, team = OutDir.of(out), ranks()
    with contextlib.ExitStack() as held:
        team.on_main(lambda: held.enter_context(out.lock()))  # one lock holder, or every rank stops
        team.on_main(lambda: check(cfg, out))
        return _run(cfg, out, team)


def check(cfg: Config, out: OutDir) -> None:
    """Everything `slm run` can know to be wrong before its first step, as one UserError: settings that conflict
    with the out dir's stored config, splits the corpus lacks (held-out splits for eval.splits and
    analysis.bucket_split, a reference split for reference.mode=trained), the grid's runs, the tasks."""
    outconfig.check(cfg, out)
    data = cfg.data
    splits = list(CORPORA[data.corpus](data))  # lazy: the documents are not read here
    held_out = [s for s in splits if s not in ("train", "reference")]
    where = f"data.corpus={data.corpus}" + (" (data.sources)" if data.corpus == "custom" else "")
    if not held_out:
        raise UserError(f"{where} has no held-out split, only {', '.join(splits)}: `slm run` evaluates every run on "
                        "held-out text; add one, e.g. data.sources.val=FILE (eval.splits then defaults to it)")
    missing = [s for s in (*cfg.eval.splits, cfg.analysis.bucket_split) if s not in held_out]
    if missing:
        raise UserError(f"eval.splits / analysis.bucket_split name {', '.join(dict.fromkeys(missing))}, which "
                        f"{where} does not have as a held-out split: set them to some of {', '.join(held_out)}")
    if cfg.analysis.bucket_split not in cfg.eval.splits:
        raise UserError(f"analysis.bucket_split={cfg.analysis.bucket_split} must be one of eval.splits "
                        f"({', '.join(cfg.eval.splits)}): the buckets compare the runs' losses on it")
    if cfg.reference.mode == "trained" and "reference" not in splits:
        raise UserError(f"reference.mode=trained trains the reference model on the reference split, which {where} "
                        "lacks: add data.sources.reference=FILE (clean text), or use reference.mode=self, path or ema")
    cfg.grid_runs(has_noise=data.noise_rate > 0)  # every run of the grid validates
    if cfg.eval.tasks:
        check_tasks(cfg)


def _run(cfg: Config, out: OutDir, team: Ranks) -> dict[str, Any] | None:
    start = time.perf_counter()
    prepared = team.on_main(lambda: prepare(cfg, out))
    team.on_main(lambda: outconfig.remember(cfg, out))
    train_tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_len
    configs = cfg.grid_runs(has_noise=bool(prepared.get("train", {}).get("noise_rate")))
    val_tokens = sum(prepared.get(s, {}).get("n_tokens", 0) for s in cfg.eval.splits)
    own = cfg.reference.is_self  # the students' own weights are the reference: no reference model, no score store
    evaluated = [*configs, *([] if own else ["reference"]), "base"]
    tasks = [Task("reference", 0 if own else 3 * cfg.reference.steps * cfg.reference.batch_size * cfg.data.block_len),
             Task("score", prepared["train"]["n_tokens"] if cfg.scoring.mode == "offline" and not own else 0),
             *(Task(f"train {n}", 3 * train_tokens) for n in configs),
             *(Task(f"eval {n}", val_tokens) for n in evaluated),
             Task("analyze + report", val_tokens)]
    bar = tqdm(total=sum(t.cost for t in tasks), desc="slm run", unit="tok", unit_scale=True, position=0,
               dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
               disable=not team.main)
    progress = iter(tasks)

    def advance() -> None:
        task = next(progress)
        bar.set_description(f"slm run · {task.label}")
        bar.update(task.cost)

    if not own:
        reference(cfg, out)
        team.wait()  # reference.json is written before any rank scores with it
    advance()
    if cfg.scoring.mode == "offline" and not own and any(c.train.needs_reference() for c in configs.values()):
        score(cfg, out)
    advance()
    # Online scoring, and objectives that read the reference's distribution, run the reference model in every step:
    # loaded once for all runs.
    online = cfg.scoring.mode == "online" or any("reference_logits" in c.train.selection().needs
                                                 for c in configs.values())
    ref_model = load_reference_model(cfg, out) if online and not own else None
    for name, run_cfg in configs.items():
        train(run_cfg, out, name, reference_model=ref_model, replace_stale=True)
        advance()
    if not team.main:
        return None
    for name in evaluated:
        evaluate(configs.get(name, cfg), out, name)
        if name in configs:
            evaluate_trajectory(cfg, out, name)
        advance()
    before = read_json(out.results).get("inputs") if out.results.is_file() else None
    results = analyze(cfg, out)
    if results["inputs"] != before or not out.report.is_file():
        report(cfg, out)
    advance()
    bar.close()
    return {"out": str(out), "runs": {n: {s: round(v["ppl"], 3) for s, v in r["val"].items()}
                                      for n, r in results["runs"].items()},
            "report": str(out.report), "seconds": round(time.perf_counter() - start, 1)}
