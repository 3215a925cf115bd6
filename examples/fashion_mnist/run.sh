#!/usr/bin/env bash
# Fashion-MNIST end to end: train split -> shards -> train/main.py (clipkit-tiny) -> zero-shot on the 10k test split,
# linear probe and kNN (train split features -> test split).
#
#   bash examples/fashion_mnist/run.sh                      # CPU (STEPS=300 BATCH=128): 30-70 samples/s on 2 cores
#   STEPS=400 BATCH=128 bash examples/fashion_mnist/run.sh  # BENCHMARKS.md's CPU run: 81% zero-shot, 48 min in all
#   DEVICE=cuda STEPS=2000 BATCH=512 WORKERS=12 LR=2e-3 bash examples/fashion_mnist/run.sh  # one H200: 91.7%, ~4 min
#   STEPS=5 SMOKE=1 bash examples/fashion_mnist/run.sh      # smoke-sized: 2k shard samples, 500 eval images
#
# Env: FMNIST (idx dir, default /usr/share/datasets/fashion-mnist), OUT (default runs/fmnist), PY (python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/fmnist}
DEVICE=${DEVICE:-cpu}
STEPS=${STEPS:-300}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-2}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-$((STEPS / 10))}
SMOKE=${SMOKE:-}
shard_cap=(--per-shard 5000); eval_cap=()
if [ -n "$SMOKE" ]; then shard_cap=(--per-shard 500 --max-samples 2000); eval_cap=(--max-samples 500 --max-train-samples 2000); fi

mkdir -p "$OUT"
if [ ! -e "$OUT/shards/shard-000000.tar" ]; then
  $PY examples/fashion_mnist/make_shards.py --root "$FMNIST" --out "$OUT/shards" "${shard_cap[@]}"
fi
shards=$(ls "$OUT"/shards/shard-*.tar | tr '\n' ' ')
n_shards=$(echo "$shards" | wc -w)
spec="$OUT/shards/shard-{000000..$(printf %06d $((n_shards - 1)))}.tar"
zs_cap=2000; [ -n "$SMOKE" ] && zs_cap=200
$PY train/main.py --model clipkit-tiny --train-data "$spec" --batch-size "$BATCH" --steps "$STEPS" --lr "$LR" \
  --wd 0.1 --warmup "$WARMUP" --seed 0 --precision fp32 --workers "$WORKERS" --output-dir "$OUT/run" --no-progress \
  --zeroshot-data "fashion-mnist:$FMNIST:test" --zeroshot-every $((STEPS / 4 > 0 ? STEPS / 4 : 1)) \
  --zeroshot-max-samples $zs_cap --save-every "$STEPS"

common=(--model "$OUT/run" --device "$DEVICE" --workers "$WORKERS" --no-progress)
for t in simple openai; do
  $PY eval/zeroshot.py "${common[@]}" --dataset "fashion-mnist:$FMNIST:test" --templates $t \
    --output "$OUT/results/zeroshot_$t.json" ${SMOKE:+--max-samples 500}
done
probe=(--train-dataset "fashion-mnist:$FMNIST:train" --test-dataset "fashion-mnist:$FMNIST:test" "${eval_cap[@]}")
$PY eval/linear_probe.py "${common[@]}" "${probe[@]}" --output "$OUT/results/linear_probe.json"
$PY eval/knn.py "${common[@]}" "${probe[@]}" --k 20 --output "$OUT/results/knn.json"
$PY eval/report.py "$OUT/results" --csv "$OUT/results/all.csv" --markdown "$OUT/results/all.md"
cat "$OUT/results/all.md"
