#!/usr/bin/env bash
# The #21 table: perplexity in and out of the calibration domain (pydoc held-out windows and the
# enwiki excerpt, 40 windows of 512 each), W4 / W3 g64, for fp32, RTN, polyquant GPTQ (old damping
# 0.01 and the default), GPTQModel and AWQ, each calibrated on pydoc and on the default mix
# (32 x 512 windows, seed 0), one thread. One configuration per process; rows append to $OUT.
#   GPTQMODEL_PY=.venv-gptqmodel/bin/python OUT=benchmarks/results/gptq-ood.jsonl benchmarks/gptq_ood_table.sh
# Summarise with: python benchmarks/gptq_ood_summary.py $OUT
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results/gptq-ood.jsonl}"
PEER="${GPTQMODEL_PY:-}"
W="${WINDOWS:-40}"
common=(--texts pydoc,enwiki --windows "$W" --threads 1 --n-samples 32 --seqlen 512 --out "$OUT")
pq() { OMP_NUM_THREADS=1 python benchmarks/bench_gptq_default.py "${common[@]}" "$@"; }
peer() { [ -n "$PEER" ] && OMP_NUM_THREADS=1 GPTQMODEL_CPU_WORKERS=1 "$PEER" benchmarks/peer_gptqmodel.py \
           --texts pydoc,enwiki --windows "$W" --threads 1 --n-samples 32 --seqlen 512 --out "$OUT" "$@"; }
ROWS="${ROWS:-w4 w3}"
pq --method fp32
for r in $ROWS; do
  b="${r#w}"
  pq --method rtn --bits "$b" --group-size 64
  pq --method gptq --bits "$b" --group-size 64 --calib pydoc
  pq --method gptq --bits "$b" --group-size 64 --calib mix
  peer --bits "$b" --group-size 64 --calib pydoc
  peer --bits "$b" --group-size 64 --calib mix
  pq --method gptq --bits "$b" --group-size 64 --calib pydoc --damp 0.01
  pq --method awq --bits "$b" --group-size 64 --calib pydoc
  pq --method awq --bits "$b" --group-size 64 --calib mix
done
