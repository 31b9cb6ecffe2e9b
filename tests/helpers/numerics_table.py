"""The worst measured/bound ratio per kind of comparison, from `SLM_TEST_NUMERICS_LOG` files (docs/tests.md).

Usage: python tests/helpers/numerics_table.py LABEL=LOG.jsonl ...  (one Markdown row per log, a setting each)

A ratio above 1 is a comparison that failed: within a passing suite only the ones a test expects to fail (the
real difference of distillation against CLM), listed below the table with their tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# column -> the measured/bound ratio of a record, None for the records of other columns
COLUMNS = {
    "loss (float64)": lambda r: r["error"] / r["bound"] if r["kind"] == "loss_float32" else None,
    "gradient (float64)": lambda r: r["error"] / r["bound"] if r["kind"] == "grad_float32" else None,
    "updates' norm": lambda r: r["ratio"] if r["kind"] == "updates" else None,
    "worst weight": lambda r: r["elem_ratio"] if r["kind"] == "updates" else None,
    "logged loss": lambda r: r["ratio"] if r["kind"] == "figure" and r["what"] == "loss" else None,
    "grad norm": lambda r: r["ratio"] if r["kind"] == "figure" and r["what"] == "grad_norm" else None,
    "score means": lambda r: r["ratio"] if r["kind"] == "figure" and r["what"].startswith("score_") else None,
}
HELPER_TESTS = ("test_numerics.py::test_same_updates", "test_numerics.py::test_selection_within_noise")


def table(logs: dict[str, Path]) -> str:
    """Markdown: a row per setting, the worst ratio of each column; then the failed comparisons and the count of
    first selections that differ from the float64 scores' own (ties within the noise)."""
    lines = ["| setting | " + " | ".join(COLUMNS) + " | ties |", "|---" * (len(COLUMNS) + 2) + "|"]
    failed = []
    for label, path in logs.items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        records = [r for r in records if not any(h in r["test"] for h in HELPER_TESTS)]
        worst = dict.fromkeys(COLUMNS, 0.0)
        for r in records:
            ratios = {c: ratio for c, ratio_of in COLUMNS.items() if (ratio := ratio_of(r)) is not None}
            if any(v > 1 for v in ratios.values()):  # a failed comparison: none of its ratios is a margin
                failed.append(f"{label}: {r['test']} " + ", ".join(f"{c} {v:.3g}" for c, v in ratios.items()))
                continue
            for column, ratio in ratios.items():
                worst[column] = max(worst[column], ratio)
        ties = sum(r["kind"] == "selection" and not r["same_as_scores"] for r in records)
        lines.append(f"| {label} | " + " | ".join(f"{v:.2g}" for v in worst.values()) + f" | {ties} |")
    return "\n".join(lines + ["", "Above their bounds (expected failures):", *failed])


if __name__ == "__main__":
    print(table({label: Path(log) for label, log in (arg.rsplit("=", 1) for arg in sys.argv[1:])}))
