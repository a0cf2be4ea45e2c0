#!/usr/bin/env bash
# One device call on 2 GPUs: NCCL self-checks, a CP=2 smoke run with blocking launches (finds the
# failing kernel if any), then the 1b at 128K/256K on one GPU and CP=2 (only if the smoke passed).
set -u
OUT=${OUT:-runs/gpu_cp}; mkdir -p "$OUT"; RES="$OUT/distributed.jsonl"
export OMP_NUM_THREADS=8 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TR="python -m torch.distributed.run --standalone"
B="benchmarks/distributed.py train --preset 1b --rows 1 --steps 2 --warmup 1 --checkpointing"
timeout ${T_CHECK:-120} $TR --nproc_per_node 2 tests/parallel_checks.py > "$OUT/selfcheck.log" 2>&1
echo "selfcheck rc=$?"; grep -E "selfcheck:|rel err|FAILED|Error|File \"/work" "$OUT/selfcheck.log" | grep -v Warn | tail -24
[ "${SKIP_SMOKE:-0}" = 1 ] && smoke=0 || {
CUDA_LAUNCH_BLOCKING=1 timeout ${T_SMOKE:-80} $TR --nproc_per_node 2 $B --layouts cp2 --seq-len 16384 \
  --out "$OUT/smoke.jsonl" > "$OUT/cp_smoke.log" 2>&1
smoke=$?; echo "cp smoke rc=$smoke"; grep -E "RESULT|Error|File \"/work" "$OUT/cp_smoke.log" | head -20; }
timeout ${T_SINGLE:-170} $TR --nproc_per_node 1 $B --layouts single --seq-len 131072,262144 --out "$RES" \
  > "$OUT/single.log" 2>&1; echo "single rc=$?"; grep -E "RESULT|Error" "$OUT/single.log" | tail -4
if [ $smoke -eq 0 ]; then
  timeout ${T_CP:-170} $TR --nproc_per_node 2 $B --layouts cp2 --seq-len 131072,262144 --out "$RES" \
    > "$OUT/cp.log" 2>&1; echo "cp rc=$?"; grep -E "RESULT|Error" "$OUT/cp.log" | tail -4
fi
[ -f "$RES" ] && python benchmarks/distributed.py report "$RES" | tee "$OUT/report.md"
