#!/usr/bin/env bash
# Distributed checks and benchmarks on one host with 2 GPUs (kind nvidia-h100-x2).
#
#   bash benchmarks/run_distributed_gpu.sh check ep     # NCCL equivalence checks + EP=2 vs DP=2
#   bash benchmarks/run_distributed_gpu.sh cp           # CP=2 at 128K / 256K vs one GPU
#   bash benchmarks/run_distributed_gpu.sh all          # both (may exceed a 10-minute limit)
# Worst case (every timeout hit): check+ep 9 min, cp 9 min. Stage limits: T_CHECK, T_EP,
# T_SINGLE, T_CP (seconds).
#
# Results: $OUT/distributed.jsonl (one JSON line per run), $OUT/*.log, and the markdown tables in
# $OUT/distributed_report.md. Each stage keeps going when one run fails (OOM, timeout).
set -u
OUT=${OUT:-runs/bench_distributed}
mkdir -p "$OUT"
RES="$OUT/distributed.jsonl"
export OMP_NUM_THREADS=8 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
TR="python -m torch.distributed.run --standalone"
stages=${*:-all}
has() { [[ " $stages " == *" $1 "* || " $stages " == *" all "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpus.txt"

if has check; then
  echo "== NCCL equivalence checks (2 ranks): distributed == single process"
  timeout ${T_CHECK:-240} $TR --nproc_per_node 2 tests/parallel_checks.py 2>&1 | tee "$OUT/selfcheck.log" \
    | grep -v "Warning\|warn(" | tail -25
fi

if has ep; then
  echo "== 1b: DP=2 (FSDP) vs EP=2 (and EP=2 with 2 overlap groups), 2 x 8K tokens per GPU"
  timeout ${T_EP:-300} $TR --nproc_per_node 2 benchmarks/distributed.py train --preset 1b \
    --layouts dp2,ep2,ep2g2 --seq-len 8192 --rows 2 --steps 4 --warmup 2 --out "$RES" \
    2>&1 | tee "$OUT/ep.log" | grep "RESULT\|Error\|error" | tail -8
fi

if has cp; then
  echo "== 1b, one GPU: 64K, 128K, 256K until it no longer fits"
  timeout ${T_SINGLE:-240} $TR --nproc_per_node 1 benchmarks/distributed.py train --preset 1b --layouts single \
    --seq-len 65536,131072,262144 --rows 1 --steps 2 --warmup 1 --checkpointing --out "$RES" \
    2>&1 | tee "$OUT/single.log" | grep "RESULT\|Error\|error" | tail -5
  for seq in 131072 262144; do
    echo "== 1b, CP=2 at $seq"
    timeout ${T_CP:-150} $TR --nproc_per_node 2 benchmarks/distributed.py train --preset 1b --layouts cp2 \
      --seq-len $seq --rows 1 --steps 2 --warmup 1 --checkpointing --out "$RES" \
      2>&1 | tee "$OUT/cp_$seq.log" | grep "RESULT\|Error\|error" | tail -5
  done
fi

[ -f "$RES" ] && python benchmarks/distributed.py report "$RES" | tee "$OUT/distributed_report.md"
