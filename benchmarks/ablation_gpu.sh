#!/usr/bin/env bash
# The paper's ablation and a context extension on one GPU, in chunks of under 9 minutes.
#
#   STAGE=0 bash benchmarks/ablation_gpu.sh   # < 1 min: sliding-window paths on CUDA vs reference
#   STAGE=1 ...  train softmax      (~96M params, ABLATE_FLOPS training FLOPs)
#   STAGE=2 ...  train lightning
#   STAGE=3 ...  train hybrid       (7:1)
#   STAGE=4 ...  train hybrid_swa   (7:1, sliding-window softmax)
#   STAGE=5 ...  evaluate the four + tables and figures  -> $OUT/ablate/
#   STAGE=6 ...  context extension 4K -> 32K (two stages) -> $OUT/context/training.png
#   STAGE=7 ...  evaluate both stages' models by length (2K .. 64K: up to 16x / 2x their training
#                lengths); re-run until it reports nothing left
#   STAGE=all    everything in order (no time box)
#
# A training chunk stops itself with SIGTERM after CHUNK_SECONDS (default 480): the run saves a
# checkpoint and the chunk exits 143; the same STAGE again resumes it. Checkpoints live in
# $RUNS (default runs/gpu: ignored by git, kept on the machine between calls); each chunk copies
# what it has (tables, figures, metrics) to $OUT when set.
#
# Budgets (env): ABLATE_FLOPS (default 5e15 training FLOPs per ablation run, ~19M tokens, a few
# minutes each on an H200 at our throughput - see the log's tok/s), CTX_TOKENS_4K (8e6),
# CTX_TOKENS_32K (4e6).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGE="${STAGE:-all}"
RUNS="${RUNS:-runs/gpu}"
OUT="${OUT:-$RUNS/out}"
CHUNK="${CHUNK_SECONDS:-480}"
FLOPS="${ABLATE_FLOPS:-5e15}"
TOK4="${CTX_TOKENS_4K:-8e6}"
TOK32="${CTX_TOKENS_32K:-4e6}"
SUITE="${SUITE:-configs/ablations}"   # configs/ablations/tiny: the same on a CPU, tiny
mkdir -p "$RUNS" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

boxed() {  # run "$@" for at most CHUNK seconds; SIGTERM saves a checkpoint (exit 143)
  if [ "$STAGE" = all ]; then "$@"; else timeout -s TERM -k 60 "$CHUNK" "$@"; fi
  local rc=$?
  if [ $rc -eq 143 ] || [ $rc -eq 124 ]; then
    echo "== time box reached: checkpoint saved; run STAGE=$STAGE again to continue =="
  fi
  return $rc
}

collect() {  # copy results (tables, figures, metrics, eval JSON; not checkpoints, weights, data)
  for d in ablate context; do
    [ -d "$RUNS/$d" ] && tar -C "$RUNS" --exclude=checkpoints --exclude=model --exclude=data \
      --exclude='*.tmp' -cf - "$d" | tar -C "$OUT" -xf - 2>/dev/null
  done
  return 0
}
trap collect EXIT

train_one() {
  python -m minimax01 ablate "$SUITE" --out "$RUNS/ablate" --flops "$FLOPS" --phase data
  boxed python -m minimax01 ablate "$SUITE" --out "$RUNS/ablate" --flops "$FLOPS" \
    --phase train --only "$1"
}

ablate_eval() {  # one run at a time while the time box allows (a re-run continues), then report
  local r
  for r in softmax lightning hybrid hybrid_swa; do
    [ -f "$RUNS/ablate/evals/$r.json" ] && continue
    if [ "$STAGE" != all ] && [ "$SECONDS" -gt $((CHUNK - 150)) ]; then
      echo "== time box reached before evaluating $r: run STAGE=$STAGE again =="; return 143
    fi
    python -m minimax01 ablate "$SUITE" --out "$RUNS/ablate" --flops "$FLOPS" --phase eval \
      --only "$r" || return
  done
  python -m minimax01 ablate "$SUITE" --out "$RUNS/ablate" --flops "$FLOPS" --phase report
}

context_train() {
  local cfg="$RUNS/context_extension.toml"
  python -m minimax01.eval.ablation corpus "$SUITE/context_corpus.toml" "$RUNS/context/data" || return
  # this session's budgets: the two stages' `tokens`
  awk -v a="$TOK4" -v b="$TOK32" '/^tokens = /{n++; print "tokens = " (n==1 ? a : b); next} {print}' \
    "$SUITE/context_extension.toml" > "$cfg"
  boxed python -m minimax01 train --config "$cfg" --train.progress false \
    --data.source "$RUNS/context/data/train.jsonl" --train.out_dir "$RUNS/context/run" &&
  python -m minimax01 plot "$RUNS/context/run" --out "$RUNS/context/training.png"
}

context_eval() {  # every stage's model at lengths from half the first to 2x the last length
  local run="$RUNS/context/run" out="$RUNS/context" plan
  plan=$(python -c "
import json, sys
st = json.load(open('$run/stages.json'))
lens, n = [], st[0]['seq_len'] // 2
while n <= 2 * st[-1]['seq_len']:
    lens.append(str(n)); n *= 2
for s in st:
    print(s['out_dir'], s['seq_len'], ','.join(lens), 2 * st[-1]['seq_len'])
") || return
  while read -r dir len lengths ctx; do
    local name; name=$(basename "$dir")
    [ -f "$out/ppl_$name.json" ] && continue  # evaluated in an earlier chunk
    if [ "$STAGE" != all ] && [ "$SECONDS" -gt $((CHUNK - 240)) ]; then
      echo "== time box reached before evaluating $name: run STAGE=$STAGE again =="; return 143
    fi
    python -m minimax01 eval passkey --checkpoint "$dir/model" --train-length "$len" \
      --lengths "$lengths" --depths 0,0.25,0.5,0.75,1 --samples "${CTX_SAMPLES:-1}" --batch-size 2 \
      --json "$out/passkey_$name.json" --plot "$out/passkey_$name.png" </dev/null || return
    python -m minimax01 eval ppl --checkpoint "$dir/model" --train-length "$len" \
      --data "$RUNS/context/data/heldout.txt" --context "$ctx" --chunk 4096 --max-windows 2 \
      --json "$out/ppl_$name.json" --plot "$out/ppl_$name.png" </dev/null || return
  done <<< "$plan"
}

rc=0
case "$STAGE" in
  0) python benchmarks/check_sliding_gpu.py; rc=$? ;;
  1) train_one softmax; rc=$? ;;
  2) train_one lightning; rc=$? ;;
  3) train_one hybrid; rc=$? ;;
  4) train_one hybrid_swa; rc=$? ;;
  5) ablate_eval; rc=$? ;;
  6) context_train; rc=$? ;;
  7) context_eval; rc=$? ;;
  all)
    python benchmarks/check_sliding_gpu.py || exit 1
    for r in softmax lightning hybrid hybrid_swa; do train_one "$r" || exit $?; done
    ablate_eval && context_train && context_eval; rc=$? ;;
  *) echo "STAGE must be 0-7 or all"; exit 2 ;;
esac
collect
exit $rc
