#!/usr/bin/env bash
# Sharded eval vs one process (default: the bundled model), every per-item field compared.
#
#   bash bench/shard_identity.sh                 # 32 unit-conversion items, calculator on, fp32, CPU
#   MAX_SAMPLES=64 bash bench/shard_identity.sh  # more items
#   MODEL=runs/demo bash bench/shard_identity.sh # a trained run (writes <<a*b= annotations: calculator calls)
#
# Runs the same `mathtune eval` twice: once in 1 process, once under torchrun with 2 processes
# (gloo on CPU), one torch thread per process in both, so every batch is decoded with the same
# composition and thread count (the two things that decide fp32 rounding). The per-item logs go to
# $OUT_DIR/one and $OUT_DIR/two; the last lines print, per field, how many items are equal, and the
# script exits 1 if any field differs. --no-cache: both runs generate (the cache key differs anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-runs/shard-identity}
MAX_SAMPLES=${MAX_SAMPLES:-32}
MODEL=${MODEL:-smollm2-135m}
ARGS=(eval --model "$MODEL" --task unit-conversion --max-samples "$MAX_SAMPLES" --calculator
      --precision fp32 --device cpu --no-cache)
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

echo "== 1 process, 1 thread"
"$PY" -m mathtune "${ARGS[@]}" --output "$OUT_DIR/one"
echo "== 2 processes (torchrun, gloo), 1 thread each"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m mathtune "${ARGS[@]}" --output "$OUT_DIR/two"

"$PY" - "$OUT_DIR/one" "$OUT_DIR/two" <<'EOF'
import json, sys
from collections import Counter
from pathlib import Path

def records(folder):
    (path,) = [p for p in Path(folder).glob("*.jsonl")]
    return [json.loads(line) for line in path.read_text().splitlines()]

one, two = records(sys.argv[1]), records(sys.argv[2])
assert len(one) == len(two), f"{len(one)} items in one process, {len(two)} in two"
fields = list(dict.fromkeys(k for r in one + two for k in r))
print(f"{len(one)} items; equal per field (1 process vs 2 processes):")
differs = False
for field in fields:
    equal = sum(a.get(field, "<missing>") == b.get(field, "<missing>") for a, b in zip(one, two))
    differs |= equal != len(one)
    print(f"  {field:18s} {equal}/{len(one)}")
# what the items hold, so a match is not a match of empty fields
calls = sum(len(r["calculator_calls"] or []) for r in one)
print(f"one process: {sum(bool(r['loop']) for r in one)} loops, {calls} calculator calls, "
      f"{sum(r['correct'] for r in one)} correct, stop reasons {dict(Counter(r['stop_reason'] for r in one))}")
sys.exit(1 if differs else 0)
EOF
