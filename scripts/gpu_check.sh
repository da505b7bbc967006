#!/usr/bin/env bash
# One short run that checks esh on a CUDA machine and measures it there (under 8 minutes on one
# H100 by design; each step has its own time limit so a hang cannot eat the lease).
#
#   OUT=/some/dir bash scripts/gpu_check.sh      # default OUT: ./gpu_check_out
#
# 1. every test marked `cuda`, plus the GPU-relevant modules with the Triton kernels compiled for
#    the device (not interpreted): scan backends, state update, dispatch, LM padding;
# 2. LOCAL_RANK=0 training places every parameter on cuda:0 (torchrun's mapping; two ranks on
#    one GPU are not possible, the mapping itself is tested on the CPU with mocks);
# 3. the selective-scan benchmark (`esh bench scan --device cuda`);
# 4. end-to-end figures (benchmarks/device_stack.py): bf16 inference and training img/s beside
#    timm's models, ESH LM training tokens/s and decode ms/token, esh_medium's peak memory.
# Needs torch with CUDA, triton, timm and pytest; installs esh from this tree without
# dependencies (the lent machines have no network). Everything printed goes to $OUT/log.txt
# too; the short tables come last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
unset TRITON_INTERPRET  # compile the Triton kernels for the GPU

date -u
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
pip install --no-deps --no-build-isolation -q -e . >"$OUT/install.log" 2>&1 || echo "pip install failed: running from the tree"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1. tests on the GPU"
timeout 240 python -m pytest -q -p no:cacheprovider -m "cuda or not slow" \
    tests/ops/test_scan_triton.py tests/ops/test_state_update_triton.py tests/ops/test_scan_dispatch.py \
    tests/ops/test_selective_scan.py tests/ops/test_selective_state_update.py tests/models/test_lm_padding.py >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -n 5 "$OUT/tests.log"
timeout 120 python -m pytest -q -p no:cacheprovider -m cuda tests >"$OUT/tests_cuda.log" 2>&1
echo "cuda-marked tests rc=$?"; tail -n 3 "$OUT/tests_cuda.log"

echo "== 2. LOCAL_RANK=0 places the model on cuda:0"
LOCAL_RANK=0 timeout 120 python - <<'EOF'
import tempfile

from esh.train.trainer import VisionTrainConfig, VisionTrainer

out = tempfile.mkdtemp()
trainer = VisionTrainer(VisionTrainConfig(model="mambavision_nano", epochs=1, max_steps=1, device="cuda", out=out, progress=False))
devices = {str(p.device) for p in trainer.model.parameters()}
print("parameter devices:", devices)
assert devices == {"cuda:0"}, devices
EOF
echo "placement rc=$?"

echo "== 3. selective-scan benchmark"
timeout 150 python -m esh bench scan --device cuda >"$OUT/bench_scan.md" 2>"$OUT/bench_scan.err"
echo "bench scan rc=$?"

echo "== 4. end-to-end figures"
timeout 200 python benchmarks/device_stack.py --device cuda >"$OUT/device_stack.md" 2>"$OUT/device_stack.err"
echo "device stack rc=$?"

cat "$OUT/bench_scan.md" "$OUT/device_stack.md"
