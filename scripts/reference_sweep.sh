#!/usr/bin/env bash
# Reference strength -> separation of excess loss by token kind -> validation perplexity.
# One reduced grid (CLM + top-k r0.5) per reference setting, each in its own out dir; the
# default study's token store and base-model losses are reused when out/champ-smollm2 exists.
# Usage: scripts/reference_sweep.sh [NAME "OVERRIDES" ...]   (no arguments: the sweep of docs/default-study.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SLM=${SLM:-.venv/bin/slm}
ROOT=${ROOT:-out/reference-sweep}
if [ $# -eq 0 ]; then
  set -- \
    lora-40-3e-4 "reference.steps=40 reference.lr=3e-4" \
    lora-80-2e-3 "reference.steps=80 reference.lr=2e-3" \
    full-80-1e-4 "reference.steps=80 reference.lr=1e-4 reference.lora=false" \
    lora-120-3e-3 "reference.steps=120 reference.lr=3e-3"
fi
while [ $# -ge 2 ]; do
  name=$1 overrides=$2
  shift 2
  out=$ROOT/$name
  mkdir -p "$out"
  for d in data base; do  # reuse what does not depend on the reference
    [ -d "out/champ-smollm2/$d" ] && [ ! -e "$out/$d" ] && cp -r "out/champ-smollm2/$d" "$out/$d"
  done
  # shellcheck disable=SC2086
  $SLM run --out "$out" $overrides "grid.methods=[topk]" "grid.ratios=[0.5]" grid.oracle=false > "$out.log" 2>&1
  .venv/bin/python - "$name" "$out" "$overrides" <<'PY'
import json, sys
name, out, overrides = sys.argv[1:]
r = json.load(open(f"{out}/results.json"))
sep = {k: round(v["p_clean_outranks"], 3) for k, v in r.get("separation_step0", {}).items() if k != "clean"}
by_kind = r["selection"]["topk-r0.5"].get("by_kind", {})
rel = {k: round(v / by_kind["clean"], 2) for k, v in by_kind.items() if v is not None and k != "clean"}
val = {n: {s: round(v["ppl"], 3) for s, v in r["runs"][n]["val"].items()} for n in ("reference", "clm", "topk-r0.5")}
delta = {s: {k: round(v, 2) for k, v in d.items()} for s, d in r["runs"]["topk-r0.5"]["delta_vs_clm"].items()}
print(json.dumps({"name": name, "overrides": overrides, "p_clean_outranks_step0": sep,
                  "topk_r0.5_share_vs_clean": rel, "val_ppl": val, "topk_delta_vs_clm_pct": delta}))
PY
done
