#!/usr/bin/env bash
# Every GPU check of fprobe in one go (about 6-8 minutes on one H100): the CUDA tests, δH₁ by jvp vs
# gradient and the probe vs the imperative probe at 1024 tokens, memory against sequence length and
# against a bare training step, and one probe of a Qwen2.5-1.5B-shaped model with LoRA (benchmarks/README.md).
#
#     bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: gpu-results; each step's output in OUT_DIR/<step>.txt
#     bash benchmarks/gpu.sh --tiny [OUT_DIR] # the same steps at tiny sizes on the CPU: checks that the script runs
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" = "--tiny" ]; then
    TINY=1; shift
else
    TINY=0
fi
OUT=${1:-gpu-results}
mkdir -p "$OUT"
status=0

run() {  # run NAME SECONDS COMMAND...: output to $OUT/NAME.txt (and the terminal), a failure is reported, not fatal
    local name=$1 seconds=$2; shift 2
    echo "=== $name: $*" | tee "$OUT/$name.txt"
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$TINY" = 1 ]; then  # the same command lines on the CPU, each script cut to its --quick size
    DEV=cpu; QUICK=--quick
else
    DEV=cuda; QUICK=
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
fi
run test_cuda 240 "$PY" -m pytest -q -rs tests/test_cuda.py
run real_size 900 "$PY" benchmarks/real_size.py --device $DEV --n-eval 2048 --n-update 64 --prompt 128 --response 128 --micro-batch 32 --no-second-order $QUICK --json "$OUT/real_size.json"
run jvp_vs_grad 180 "$PY" benchmarks/jvp_vs_grad.py --device $DEV --sizes 15m,60m --lengths 1024 $QUICK --json "$OUT/jvp_vs_grad.json"
run probe_vs_imperative 120 "$PY" benchmarks/probe_vs_imperative.py --device $DEV --size 60m --length 1024 --n-u 16 --n-e 32 --micro-batch 8 $QUICK --json "$OUT/probe_vs_imperative.json"
run long_sequences 180 "$PY" benchmarks/long_sequences.py --device $DEV --size 15m --lengths 1024,2048,4096,8192 --whole-lengths 1024,2048 --time-length 1024 $QUICK --json "$OUT/long_sequences.json"
run probe_memory 120 "$PY" benchmarks/probe_memory.py --device $DEV --size 60m --length 1024 --micro-batch 8 $QUICK --json "$OUT/probe_memory.json"
exit $status
