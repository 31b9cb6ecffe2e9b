"""Bench: the shape of bench.json and the memory probe; timing targets are never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selective_lm.bench import (
    PASS_VARIANTS,
    SIDE_CASES,
    TRAIN_VARIANTS,
    bench,
    format_table,
    peak_mb,
    precision,
    prepare_case,
    targets,
)
from selective_lm.config import load_config
from selective_lm.store.layout import OutDir

TINY = ["bench.steps=1", "bench.warmup=0", "bench.batch_size=2", "bench.block_len=32", "bench.large_vocab=4096",
        "bench.cases=[]"]


def test_bench_writes_every_case_variant_and_target(tmp_path: Path, capsys) -> None:
    summary = bench(load_config("smoke", overrides=TINY), tmp_path)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert summary["bench"] == str(tmp_path / "bench.json")
    assert result["device"] and set(result["cases"]) == {"tiny-llama-lora", "large-vocab"}
    for name, case in result["cases"].items():
        assert case["logits_mb"] > 0 and case["tokens"] == 2 * 32
        for variant in (*TRAIN_VARIANTS, *PASS_VARIANTS):
            assert case[variant]["step_s"] > 0 and case[variant]["step_s_spread"] >= 0, (name, variant)
            assert len(case[variant]["step_s_all"]) == 1
        for variant in PASS_VARIANTS:
            assert case[variant]["tokens_per_s"] > 0
        for variant in (*TRAIN_VARIANTS, "score", "forward"):
            assert case[variant]["peak_mb"] >= 0
    assert result["cases"]["large-vocab"]["vocab_size"] == 4096
    assert set(result["targets"]) == {"slm_step_vs_clm", "naive_step_vs_slm", "score_vs_forward",
                                      "slm_peak_vs_clm", "loss_path_peak_vs_logits"}
    for target in result["targets"].values():
        assert {"case", "rule", "value", "threshold", "pass"} <= set(target)
        assert target["value"] is None or target["value"] > 0
    assert set(summary["targets"]) == set(result["targets"])
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(result) and "large-vocab" in printed and "naive" in printed


def test_peak_probe_sees_a_transient_allocation_and_not_what_was_resident() -> None:
    resident = torch.ones(50_000_000)  # 200 MB allocated before: not part of the peak
    peak = peak_mb(lambda: torch.ones(25_000_000).sum(), torch.device("cpu"))  # 100 MB, freed at once
    assert peak is not None and 90 < peak < 150, peak
    del resident


GPU_TINY = ["bench.cases=[gpu]", "bench.gpu_on_cpu=true", "bench.gpu_model=random:tiny-llama", "bench.gpu_vocab=512",
            "bench.gpu_block_len=32", "bench.gpu_batch_size=1", "bench.gpu_peak_tflops=1"]


def test_gpu_case_reports_tokens_per_second_and_mfu(tmp_path: Path, capsys) -> None:
    bench(load_config("smoke", overrides=[*TINY, "bench.large_vocab=0", *GPU_TINY, "bench.profile=true"]), tmp_path)
    gpu = json.loads((tmp_path / "bench.json").read_text())["gpu"]
    for v in (*TRAIN_VARIANTS, *PASS_VARIANTS):  # bench.profile: one step each; on the CPU, no kernels
        prof = gpu[v]["profile"]
        assert prof["kernels"] == 0 and prof["busy"] is None and prof["top_kernels"] == []
        names = [name for name, ms, calls in prof["top_host_ops"]]
        assert len(names) == 8 and all(ms >= 0 and calls >= 1 for _, ms, calls in prof["top_host_ops"])
        assert any(n.startswith("aten::") for n in names), names
    assert any("mm" in n for n, _, _ in gpu["forward"]["profile"]["top_host_ops"])  # the forward's matmuls
    assert gpu["model"] == "random:tiny-llama" and not gpu["lora"] and gpu["block_len"] == 32
    # The smoke model's matmul weights from its shape: q, o (d x d), k, v (d x kv), the MLP, 2 norms per layer,
    # the final norm and the head (tied to the embedding, so counted once).
    d, ff, layers, vocab, kv = 64, 128, 2, 512, 2 * 64 // 4
    attn = d * d * 2 + d * kv * 2
    assert gpu["matmul_params"] == layers * (attn + 3 * d * ff + 2 * d) + d + vocab * d
    flops = gpu["model_flops_per_token"]
    assert flops["train"] == 6 * gpu["matmul_params"] + 12 * layers * d * 32
    for v in ("clm", "slm", "naive", "score", "forward"):
        e = gpu[v]
        assert e["mfu"] == pytest.approx(e["tokens_per_s"] * flops["train" if v in TRAIN_VARIANTS else "pass"] / 1e12)
    assert "MFU" in capsys.readouterr().out


def test_gpu_case_is_skipped_without_a_gpu(tmp_path: Path) -> None:
    bench(load_config("smoke", overrides=[*TINY, "bench.large_vocab=0", "bench.cases=[gpu]"]), tmp_path)
    assert "no CUDA device" in json.loads((tmp_path / "bench.json").read_text())["gpu"]["skipped"]


def test_precision_case_compares_half_precision_selections_on_the_out_dir(smoke_out: Path) -> None:
    cfg = load_config("smoke", overrides=[*TINY, "bench.large_vocab=0", "bench.cases=[precision]",
                                          "bench.precision_blocks=16"])
    summary = bench(cfg, smoke_out)
    result = json.loads((smoke_out / "bench.json").read_text())
    case = result["precision"]
    assert case["blocks"] == 16 and case["block_len"] == 64 and case["batch_size"] == cfg.train.batch_size
    for dtype in ("float16", "bfloat16"):
        assert set(case["agreement"][dtype]) == {"0.5", "0.3"}
        assert all(0.5 < v <= 1 for v in case["agreement"][dtype].values()), case["agreement"]
        assert 0 < case["max_abs_error"][dtype] < 0.05
    sizes = case["score_bytes_per_billion_tokens"]
    assert 4e9 <= sizes["float32"] < 4.1e9 and sizes["float16"] == sizes["bfloat16"] < 0.51 * sizes["float32"]
    assert case["token_store_bytes_per_billion_tokens"] > 8e9  # tokens and doc_ids, int32 each
    target = result["targets"]["score_f16_topk_agreement"]
    assert target["case"] == "precision" and target["value"] == min(case["agreement"]["float16"].values())
    assert summary["targets"]["score_f16_topk_agreement"] == target["pass"]


def test_precision_case_is_skipped_without_the_stores(tmp_path: Path) -> None:
    case = precision(load_config("smoke"), OutDir(tmp_path))
    assert set(case) == {"skipped"} and "slm run --out" in case["skipped"]
    verdict = targets({"precision": case}, "main", None, {"score_f16_topk_agreement": 0.995})
    assert verdict["score_f16_topk_agreement"]["value"] is None and verdict["score_f16_topk_agreement"]["pass"] is None
    assert targets({}, "main", None, {"score_f16_topk_agreement": 0.995}) == {}  # case not run: no verdict


def test_prepare_case_times_prepare_beside_the_bare_tokenizer(tmp_path: Path) -> None:
    assert SIDE_CASES["prepare"] is prepare_case  # bench.cases=[prepare] runs it (as the precision test shows)
    cfg = load_config("smoke", overrides=["bench.prepare_tokens=20000", "bench.prepare_rounds=2"])
    case = prepare_case(cfg, OutDir(tmp_path))
    assert case["bare"]["tokens"] >= 20_000 and case["bare"]["tokens_per_s"] > 0 and case["setup_s"] > 0
    assert set(case["runs"]) == {"1_proc", "2_proc", "noise_1_proc", "noise_2_proc"}
    for run in case["runs"].values():
        assert run["tokens"] > 0 and run["vs_bare"] == pytest.approx(run["tokens_per_s"] / case["bare"]["tokens_per_s"])
        assert len(run["s_all"]) == 2 and run["s"] == pytest.approx(sum(run["s_all"]) / 2)  # the median of 2 rounds
    assert case["runs"]["noise_1_proc"]["realized_noise_rate"] == case["runs"]["noise_2_proc"]["realized_noise_rate"]
    assert case["runs"]["noise_2_proc"]["tokens"] > case["runs"]["2_proc"]["tokens"]  # the injected text
    assert case["same_store"] == {"0.0": True, "0.2": True}
    target = targets({"prepare": case}, "main", None, {"prepare_vs_bare": 0.8})["prepare_vs_bare"]
    assert target["value"] == case["runs"]["1_proc"]["vs_bare"] and target["pass"] == (target["value"] >= 0.8)
    corpus = Path(case["corpus"])
    assert corpus.parent == OutDir(tmp_path).bench_dir and list(corpus.parent.iterdir()) == [corpus]  # store gone
    mtime = corpus.stat().st_mtime_ns
    assert prepare_case(cfg, OutDir(tmp_path))["bare"]["tokens"] == case["bare"]["tokens"]
    assert corpus.stat().st_mtime_ns == mtime  # the corpus is reused
