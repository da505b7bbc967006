#!/usr/bin/env bash
# One short run that checks esh on a CUDA machine and measures its scan there.
#
#   bash scripts/gpu_check.sh            # results under $OUT (default: ./gpu_check_out)
#
# 1. the tests marked `cuda` and the GPU-relevant modules (Triton kernels compiled for the
#    device this time, not interpreted; the dispatcher; the state update; the LM padding path),
# 2. the selective-scan benchmark on the device (`esh bench scan --device cuda`): every backend
#    that runs there against chunked and mamba_ssm, GB/s against the measured copy bandwidth,
#    and the error of the output and every gradient against the float64 loop.
# Needs torch with CUDA, triton and pytest installed; installs esh from this tree without
# dependencies (the lent machines have no network). A short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"

{
    date -u
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
} >"$OUT/device.txt" 2>&1

pip install --no-deps --no-build-isolation -q -e . >"$OUT/install.log" 2>&1 || pip install --no-deps -q -e . >>"$OUT/install.log" 2>&1

# the Triton tests compile for the GPU here: TRITON_INTERPRET must not be set
unset TRITON_INTERPRET
timeout 300 python -m pytest -q -x -p no:cacheprovider \
    tests/test_scan_triton.py tests/test_state_update_triton.py tests/test_scan_dispatch.py \
    tests/test_selective_scan.py tests/test_selective_state_update.py tests/test_lm_padding.py \
    >"$OUT/tests.log" 2>&1
echo "tests rc=$?" >>"$OUT/tests.log"

timeout 240 python -m esh bench scan --device cuda >"$OUT/bench_scan.md" 2>"$OUT/bench_scan.err"
echo "bench rc=$?" >>"$OUT/bench_scan.err"

cat "$OUT/device.txt"
tail -n 3 "$OUT/tests.log"
tail -n 2 "$OUT/bench_scan.err"
cat "$OUT/bench_scan.md"
