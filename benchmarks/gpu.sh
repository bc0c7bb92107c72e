#!/usr/bin/env bash
# The GPU benchmarks in one command, for a lent H100/H200 (see benchmarks/README.md).
#
#   benchmarks/gpu.sh [all|train_step|end_to_end|push|prp]...     (default: all)
#
# In order: the train_step headline pair (jax_bf16 vs torch_eager_amp_bf16), end_to_end,
# push, and the PRP benchmark when benchmarks/prp.py exists; all four within about 9
# minutes, compilation and data generation included. First it installs, offline, what the
# host lacks from the wheelhouse .whl/ (built by `make wheelhouse`, carried with the working
# tree; a no-op when everything imports already).
#
# Results go to $OUT when it is set (the device tool's output folder), else to
# benchmarks/results/. Each benchmark runs under its own time limit (seconds, overridable:
# TRAIN_STEP_LIMIT_S, END_TO_END_LIMIT_S, PUSH_LIMIT_S, PRP_LIMIT_S) so that one that hangs
# leaves the others their time; each writes its JSON as soon as it has a figure and rewrites
# it as it measures more, so a run stopped by its limit keeps what it measured
# ("complete": false).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
wanted=("${@:-all}")

wants() {
    local w
    for w in "${wanted[@]}"; do
        [[ $w == all || $w == "$1" ]] && return 0
    done
    return 1
}

echo "== $(date -u +%FT%TZ) $(hostname), $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
$py - <<'PY'
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")
PY
$py -m benchmarks.wheelhouse install || echo "wheelhouse install failed: end_to_end will not run"

status=0
run() {  # run LIMIT_S NAME ARGS...: one benchmark under its time limit
    local limit=$1 name=$2
    shift 2
    echo "== $(date -u +%T) $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" $py -m "benchmarks.$name" "$@" --out_dir "$out_dir" || {
        local rc=$?
        echo "== $name exited with $rc"
        status=$rc
    }
}
if wants train_step; then
    run "${TRAIN_STEP_LIMIT_S:-150}" train_step --shape cub \
        --variants jax_bf16,torch_eager_amp_bf16 --no_plot
fi
if wants end_to_end; then
    run "${END_TO_END_LIMIT_S:-210}" end_to_end --shape cub
fi
if wants push; then
    run "${PUSH_LIMIT_S:-110}" push --shape cub
fi
if wants prp && [[ -f benchmarks/prp.py ]]; then
    run "${PRP_LIMIT_S:-90}" prp --shape cub
fi
ls -l "$out_dir"
exit $status
