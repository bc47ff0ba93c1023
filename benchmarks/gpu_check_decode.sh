#!/usr/bin/env bash
# Issue 19's GPU part in one short run: the compiled kernels and the captured decode graph against
# their references (pytest), the one-row kernels' launch-parameter sweep at Llama-7B layer shapes, then
# whole-model decode (Llama-7B and -1B shapes, random weights) of bf16 and every GPU layout, plain and
# graph, with the sweep's best parameters applied. Logs and JSON under $OUT (default ./gpu-out).
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rc=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cc', torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/env.txt"
echo "== 1. compiled kernels + captured graph (pytest)"
timeout ${T_TEST:-120} $PY -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_cuda_kernels.py tests/nn/test_graph_decode.py ${TEST_K:+-k "$TEST_K"} \
  > "$OUT/pytest.log" 2>&1 || rc=1
tail -25 "$OUT/pytest.log"
echo "== 2. one-row kernel sweep (llama-7b layer shapes)"
timeout ${T_SWEEP:-100} $PY benchmarks/bench_gpu_decode.py sweep --model llama-7b --out "$OUT/sweep.json" \
  > "$OUT/sweep.jsonl" 2> "$OUT/sweep.err" || { rc=1; tail -5 "$OUT/sweep.err"; }
cut -c1-400 "$OUT/sweep.jsonl"
echo "== 3. whole-model decode"
timeout ${T_DECODE:-230} $PY benchmarks/bench_gpu_decode.py decode --models ${MODELS:-llama-7b} --apply "$OUT/sweep.json" ${DECODE_ARGS:-} \
  --out "$OUT/decode.json" > "$OUT/decode.jsonl" 2> "$OUT/decode.err" || { rc=1; tail -5 "$OUT/decode.err"; }
cut -c1-700 "$OUT/decode.jsonl"
exit $rc
