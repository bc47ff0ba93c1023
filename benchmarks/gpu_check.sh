#!/usr/bin/env bash
# Everything polyquant checks on a CUDA GPU, in one short run (a GPU session is brief):
#   1. the compiled Triton / _scaled_mm kernels against the reference (tests/kernels/test_cuda_kernels.py
#      and the CUDA parts of test_fp8_kernels.py);
#   2. triton-w4a16 against bf16 matmul, PyTorch's int4 GEMM and the bandwidth bound (layer shapes);
#   3. the FP8 kernels: activation rule bit-exact vs CPU, block-FP8 Triton vs torch._scaled_mm vs bf16;
#   4. whole-model decode / prefill tokens/s of the GPU paths against bf16 (random weights).
# Needs torch with CUDA, triton, transformers, pytest; polyquant runs from the source tree.
# Writes logs and JSON under $OUT (default ./gpu-out).  Usage: bash benchmarks/gpu_check.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rc=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cc', torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/env.txt"
echo "== 1. kernel tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_cuda_kernels.py tests/kernels/test_fp8_kernels.py 2>&1 \
  | tee "$OUT/pytest_cuda.log" | tail -15 || rc=1
echo "== 2. triton-w4a16 layer benchmark"
timeout 90 $PY benchmarks/bench_triton_w4a16.py --out "$OUT/w4a16.json" > /dev/null 2> "$OUT/w4a16.log" || { rc=1; tail -5 "$OUT/w4a16.log"; }
echo "== 3. FP8 checks and GEMM benchmark"
timeout 60 $PY benchmarks/gpu_check_fp8.py 2>&1 | tee "$OUT/fp8.jsonl" | tail -30 || rc=1
echo "== 4. whole-model speed"
timeout 220 $PY benchmarks/bench_gpu_model.py --out "$OUT/model.json" 2>&1 >/dev/null | tee "$OUT/model.log" | cut -c1-400 || rc=1
exit $rc
