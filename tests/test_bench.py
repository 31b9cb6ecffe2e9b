"""Bench: the shape of bench.json and the memory probe; timing targets are never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selective_lm.bench import PASS_VARIANTS, TRAIN_VARIANTS, bench, format_table, peak_mb
from selective_lm.config import load_config

TINY = ["bench.steps=1", "bench.warmup=0", "bench.batch_size=2", "bench.block_len=32", "bench.large_vocab=4096"]


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
