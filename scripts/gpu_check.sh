#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU and torch, transformers, peft and accelerate (it installs
# nothing), from the repository root: `bash scripts/gpu_check.sh [OUT]`. Prints one JSON object with every
# GPU figure of docs/scaling.md, its target and pass/fail (scripts/gpu_check.py says what runs), and kills
# everything it started when it ends or is stopped.
set -uo pipefail
OUT=${1:-out/gpu-check}
LIMIT=${GPU_CHECK_LIMIT:-600}  # seconds; on an H200 the benches took 92 s and pytest -m gpu 21 s (docs/scaling.md)
missing=$(python3 - <<'PY'
import importlib.util
need = ["torch", "transformers", "peft", "accelerate", "safetensors", "pydantic", "datasets", "champ_dataset", "gguf",
        "yaml", "tqdm", "pytest", "selective_lm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (pip install -e '.[dev]' installs them)" >&2
    exit 2
fi
# A process group of its own (setsid), stopped at the limit (timeout) and killed whole on exit: no child outlives it.
setsid timeout --kill-after=10 "$LIMIT" python3 scripts/gpu_check.py "$OUT" "${@:2}" &
pid=$!
trap 'kill -- -$pid 2>/dev/null' EXIT INT TERM
wait $pid
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped after $LIMIT s (what it measured is in $OUT/gpu_check.json)" >&2
exit $rc
