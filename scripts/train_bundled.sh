#!/usr/bin/env bash
# The recipe of the bundled models: baseline, then for each N priming + fine-tuning with
# distillation from the baseline, then packaging into model_repository/ (fp16).
# Every stage checkpoints and resumes: re-running this script continues where it stopped.
# Usage: bash scripts/train_bundled.sh [N ...]      (default: 2 5 10); THREADS=2 RUNS=runs
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
THREADS=${THREADS:-2}
SST2_TRAIN=$DATA/sst2/train.tsv
SST2_DEV=$DATA/sst2/dev.tsv
NS=${*:-2 5 10}

# 1. the plain baseline (N=1): all-MiniLM-L6-v2 fine-tuned on SST-2
muxserve train finetune --train "$SST2_TRAIN" --dev "$SST2_DEV" --out "$RUNS/sst2-bert" \
  --labels negative,positive --epochs 1 --batch-size 32 --lr 1e-4 --eval-every 500 --threads "$THREADS"
muxserve package "$RUNS/sst2-bert/best" --name sst2-bert

for N in $NS; do
  # keys scaled so that the mixture keeps the word-embedding scale whatever N (norm 4 at N=2):
  # with unit keys the superimposed content drowns in the position embeddings (docs/training.md)
  NORM=$(python -c "print(round(4 * ($N / 2) ** 0.5, 1))")
  # N=2: keys v_i ~ N(1, I) (--hadamard-mean 1): zero-mean random keys cost ~6 points even on a
  # single text (docs/training.md, "What limits accuracy"). N=5 and N=10: the reference's zero-mean keys.
  # N=2 also gets a masked-LM stage with multiplexing between priming and fine-tuning (SST-2 + AG News
  # + the transfer set), MLM steps then MLM_MORE more with a fresh warm-up.
  # ROUNDS: one fine-tuning round per entry, BATCH:TAKE[:mask]; each round warm-restarts from the
  # TAKE checkpoint (best or final) of the one before, and the last one's TAKE is packaged. N=2's
  # later rounds double the batch and train with the group padding mask (docs/training.md, levers).
  # SHORT: how a short group is completed; N=2 (keys with a mean) pads (docs/models.md, "Short groups")
  case $N in
    2) PRIME=1000 MLM=8000 MLM_MORE=16000 FINETUNE=2400 ROUNDS="64:best 64:best 128:final:mask 256:final:mask" MEAN=1 SHORT=pad ;;
    5) PRIME=2400 MLM=0 MLM_MORE=0 FINETUNE=8000 ROUNDS="160:best" MEAN=0 SHORT=copy ;;
    *) PRIME=3400 MLM=0 MLM_MORE=0 FINETUNE=8000 ROUNDS="320:best" MEAN=0 SHORT=copy ;;
  esac
  # 2. priming, starting from the fine-tuned baseline: recover every slot's tokens from the muxed
  #    output (SST-2 phrases: short, so cheap steps)
  muxserve train prime -N "$N" --init "$RUNS/sst2-bert/best" --train "$SST2_TRAIN" --out "$RUNS/mux$N-prime" \
    --steps "$PRIME" --batch-size $((32 * N)) --lr 5e-4 --warmup-ratio 0.05 --hadamard-norm "$NORM" --hadamard-mean "$MEAN" --retrieval-fraction 0.5 --threads "$THREADS" --bf16
  # 3. fine-tuning: task loss + distillation from the baseline + a small retrieval term, on mux
  #    groups of texts drawn regardless of length (as `muxserve eval` groups them)
  INIT="$RUNS/mux$N-prime/final"
  if [ "$MLM" -gt 0 ]; then
    [ -f "$RUNS/transfer.tsv" ] || python scripts/make_transfer_set.py "$SST2_TRAIN" "$RUNS/transfer.tsv" --size 120000
    muxserve train mlm -N "$N" --init "$INIT" --train "$SST2_TRAIN" "$DATA/agnews/train.tsv" "$RUNS/transfer.tsv" --out "$RUNS/mux$N-mlm" \
      --steps "$MLM" --batch-size $((32 * N)) --lr 1e-4 --warmup-ratio 0.05 --mixed-length-groups --save-every 500 --threads "$THREADS" --bf16
    INIT="$RUNS/mux$N-mlm/final"
  fi
  if [ "$MLM_MORE" -gt 0 ]; then
    muxserve train mlm -N "$N" --init "$INIT" --train "$SST2_TRAIN" "$DATA/agnews/train.tsv" "$RUNS/transfer.tsv" --out "$RUNS/mux$N-mlm-more" \
      --steps "$MLM_MORE" --batch-size $((32 * N)) --lr 1e-4 --warmup-ratio 0.05 --mixed-length-groups --save-every 250 --threads "$THREADS" --bf16
    INIT="$RUNS/mux$N-mlm-more/final"
  fi
  ROUND=0
  for SPEC in $ROUNDS; do
    ROUND=$((ROUND + 1))
    OUT="$RUNS/sst2-mux$N-r$ROUND"
    IFS=: read -r BATCH TAKE MASK <<< "$SPEC"
    EXTRA=""
    [ "$MASK" = mask ] && EXTRA="--mask-group-padding"
    # shellcheck disable=SC2086  # EXTRA holds a flag (or none)
    muxserve train finetune -N "$N" --init "$INIT" --teacher "$RUNS/sst2-bert/best" \
      --train "$SST2_TRAIN" --dev "$SST2_DEV" --labels negative,positive --out "$OUT" --steps "$FINETUNE" \
      --batch-size "$BATCH" --lr 1e-4 --warmup-ratio 0.03 --retrieval-coeff 0.1 --retrieval-fraction 0.25 --mixed-length-groups \
      --eval-every 400 --threads "$THREADS" --bf16 $EXTRA
    INIT="$OUT/$TAKE"
  done
  # every mux model is served with the group padding mask (docs/models.md)
  muxserve package "$INIT" --name "sst2-mux$N" --baseline sst2-bert --shadow-sample-rate 0.05 --short-group-policy "$SHORT" --mask-group-padding on
done
