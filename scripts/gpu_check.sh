#!/usr/bin/env bash
# The prepared GPU check of the scale-out work, for a machine with one CUDA GPU and this repo installed
# (`pip install -e .` over a CUDA torch). Writes out/gpu-check/bench.json and the two runs' logs.
#   1. `slm bench` case gpu: random TinyLlama-1.1B shape, bf16 autocast, batch 4 x 2048, full fine-tuning:
#      tokens/s and MFU of CLM, SLM (top-k 0.6), naive SLM steps and of scoring.
#   2. A short SLM run on the smoke data with dropout, killed at step 3 and resumed: the log must equal an
#      uninterrupted run (the CUDA RNG state is in the checkpoints).
set -euo pipefail
OUT=${OUT:-out/gpu-check}
slm bench --preset smoke --out "$OUT" bench.cases=[gpu] bench.large_vocab=0 bench.steps=5 bench.warmup=2
common=(--preset smoke --out "$OUT" train.method=topk train.ratio=0.5 train.steps=6 train.checkpoint_every=2
        model.lora_dropout=0.1)
slm prepare --preset smoke --out "$OUT" >/dev/null && slm reference --preset smoke --out "$OUT" >/dev/null
slm score --preset smoke --out "$OUT" >/dev/null
slm train "${common[@]}" train.name=straight >/dev/null
timeout --signal=INT 1000 python tests/helpers/train_proc.py 3 "$OUT/paused" train "${common[@]}" \
    train.name=resumed >/dev/null 2>&1 & pid=$!
while [ ! -f "$OUT/paused" ]; do sleep 0.5; done
kill -9 $pid || true
slm train "${common[@]}" train.name=resumed >/dev/null
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
logs = [[{k: v for k, v in json.loads(l).items() if k != "step_s"} for l in (out / "runs" / n / "log.jsonl").open()]
        for n in ("straight", "resumed")]
print("resume with dropout identical (CUDA RNG when on a GPU):", logs[0] == logs[1])
gpu = json.load(open(out / "bench.json"))["gpu"]
print(json.dumps({k: gpu.get(k) for k in ("skipped", "clm", "slm", "naive", "score", "peak_tflops")}, indent=1))
PY
