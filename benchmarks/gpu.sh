#!/usr/bin/env bash
# The GPU benchmarks in one command, for a lent H100/H200 (see benchmarks/README.md).
#
#   benchmarks/gpu.sh [train_step|push|all]     (default: all)
#
# Results go to $OUT when it is set (the device tool's output folder), else to
# benchmarks/results/. Each benchmark runs under its own time limit so that one that hangs
# leaves the others their time; train_step rewrites its JSON after every variant, so a run
# stopped by a limit keeps what it measured ("complete": false).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/results}
what=${1:-all}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
$py - <<'PY'
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")
PY

status=0
if [[ $what == all || $what == train_step ]]; then
    timeout "${TRAIN_STEP_LIMIT_S:-480}" $py -m benchmarks.train_step --shape cub --out_dir "$out_dir" || status=$?
fi
if [[ $what == all || $what == push ]]; then
    timeout "${PUSH_LIMIT_S:-240}" $py -m benchmarks.push --shape cub --out_dir "$out_dir" || status=$?
fi
ls -l "$out_dir"
exit $status
