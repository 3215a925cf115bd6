#!/usr/bin/env bash
# CLIP-score filtering on Fashion-MNIST with 30% of the captions naming a wrong class: train clipkit-tiny on all of
# it, score every pair with that model, keep the pairs above the threshold the score histogram suggests (Otsu),
# retrain from scratch on the kept part for the same number of steps, compare zero-shot top-1 on the 10k test split.
#
#   bash examples/fashion_mnist/filter_experiment.sh                     # CPU: N=20000 STEPS=150 BATCH=64
#   N=600 STEPS=3 BATCH=16 EVAL_MAX=200 bash examples/fashion_mnist/filter_experiment.sh   # smoke-sized
#
# Env: FMNIST (idx dir), OUT (default runs/fmnist_filter), PY (python), MODEL (clipkit-tiny, or a JSON config such
# as examples/sweep/clipkit-nano.json), N (training images used), CORRUPT (0.3), STEPS, BATCH, LR (2e-3), WORKERS
# (loader processes, 1), EVAL_MAX (cap on the 10k test images, default all).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/fmnist_filter}
N=${N:-20000}
CORRUPT=${CORRUPT:-0.3}
STEPS=${STEPS:-150}
BATCH=${BATCH:-64}
LR=${LR:-2e-3}
WORKERS=${WORKERS:-1}
MODEL=${MODEL:-clipkit-tiny}
EVAL_MAX=${EVAL_MAX:-}
PER_SHARD=$(( N < 5000 ? (N + 1) / 2 : 5000 ))

mkdir -p "$OUT"
if [ ! -e "$OUT/noisy/shard-000000.tar" ]; then
  $PY examples/fashion_mnist/make_shards.py --root "$FMNIST" --out "$OUT/noisy" --per-shard "$PER_SHARD" \
    --max-samples "$N" --corrupt-fraction "$CORRUPT"
fi
n_shards=$(ls "$OUT"/noisy/shard-*.tar | wc -l)
last=$(printf %06d $((n_shards - 1)))
noisy="$OUT/noisy/shard-{000000..$last}.tar"
kept="$OUT/filtered/shard-{000000..$last}.tar"

train() {  # train DATA OUTDIR
  $PY train/main.py --model "$MODEL" --train-data "$1" --batch-size "$BATCH" --steps "$STEPS" --lr "$LR" \
    --wd 0.1 --warmup $((STEPS / 10)) --seed 0 --workers "$WORKERS" --output-dir "$2" --resume auto \
    --no-progress --no-tensorboard
}
zeroshot() {  # zeroshot RUN RESULT
  $PY eval/zeroshot.py --model "$1" --dataset "fashion-mnist:$FMNIST:test" --templates simple --workers "$WORKERS" \
    --no-progress --output "$2" ${EVAL_MAX:+--max-samples "$EVAL_MAX"}
}

train "$noisy" "$OUT/run_all"
$PY data_prep/filter_shards.py --input "$noisy" --output "$OUT/scored" --model "$OUT/run_all" --scores-only \
  --no-progress
threshold=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['suggested_min_clip_score'])" \
  "$OUT/scored/manifest.json")
echo "suggested --min-clip-score $threshold (histogram: $OUT/scored/clip_scores.png)"
$PY data_prep/filter_shards.py --input "$noisy" --output "$OUT/filtered" --from-scores "$OUT/scored/scores" \
  --min-clip-score "$threshold" --workers 1 --no-progress
train "$kept" "$OUT/run_kept"
zeroshot "$OUT/run_all" "$OUT/zs_all.json"
zeroshot "$OUT/run_kept" "$OUT/zs_kept.json"
$PY examples/fashion_mnist/filter_report.py --input "$noisy" --filtered "$OUT/filtered" \
  --results "$OUT/zs_all.json" "$OUT/zs_kept.json" | tee "$OUT/report.json"
