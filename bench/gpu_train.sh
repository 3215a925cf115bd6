#!/usr/bin/env bash
# GPU training benchmark, ours vs open_clip_train 3.3, in one go on a bare single-GPU machine (issue 2, "On a GPU"):
# ViT-B-32 at 224 px, bf16, batch 256, 100 steps on synthetic shards; ours under accelerate + DeepSpeed ZeRO-2
# (train/accelerate/gpu_zero2.yaml, --num_processes 1), open_clip_train with --precision amp_bf16 then pure_bf16 on
# the same GPU and shards. Reports samples/s (steady state), peak GPU memory and MFU for each; see
# bench/train_throughput.py for how.
#
#   bash bench/gpu_train.sh                      # on the GPU machine; results in $OUT (default /tmp/gpu_train_out)
#   GPU_TRAIN_SMOKE=1 bash bench/gpu_train.sh    # CPU rehearsal: clipkit-tiny, 64 px, 5 steps, cpu_zero2.yaml,
#                                                # .venv for ours and .venv-peers-openclip for the peer
#
# On the GPU machine the image's python3 has torch, accelerate, transformers, pandas, ...; what it lacks travels as
# wheels in .whl/ (git-ignored; see BENCHMARKS.md ## GPU for how they were fetched): common ones in .whl/, webdataset
# 1.0.2 for ours in .whl/ours/, webdataset 0.2.86 for open_clip_train (newer ones break its loader) in .whl/peer/.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_train_out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu_train_work}
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)
stamp() { echo "[gpu_train +$(($(date +%s) - T0))s] $*"; }

if [ "${GPU_TRAIN_SMOKE:-0}" = 1 ]; then
    PY=$REPO/.venv/bin/python
    PEER_PY=$REPO/.venv-peers-openclip/bin/python
    OURS_PP=""
    PEER_PP=""
    ARGS=(--model clipkit-tiny --image-size 64 --batch-size 8 --steps 5 --skip 2 --workers 2
          --accelerate-config train/accelerate/cpu_zero2.yaml --precision bf16 --peer-precision amp_bf16,pure_bf16
          --peak-tflops 1 --flops --timeout 900)
else
    PY=python3
    PEER_PY=python3
    export DS_ACCELERATOR=cuda
    stamp "machine"
    { nvidia-smi; python3 -V; nproc; df -h /dev/shm /tmp; python3 -m pip list 2>/dev/null |
      grep -iE "^(torch|torchvision|accelerate|timm|numpy|pillow|transformers|huggingface.hub)[ -]"; } 2>&1 | tee "$OUT/env.txt"
    # 14 loader workers x 2 prefetched batches of 256 x 3 x 224 x 224 pass through /dev/shm: ~1.1 GB for ours
    # (uint8, clipkit.transforms), ~4.3 GB for open_clip_train (float32)
    SHM_KB=$(df -k --output=size /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
    if [ "${SHM_KB:-0}" -lt 16000000 ]; then mount -o remount,size=32G /dev/shm 2>&1 | tee -a "$OUT/env.txt"; fi
    stamp "installing wheels"
    PIPI=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
    "${PIPI[@]}" --target /tmp/site .whl/*.whl || exit 3
    "${PIPI[@]}" --target /tmp/site-ours .whl/ours/*.whl || exit 3
    "${PIPI[@]}" --target /tmp/site-peer .whl/peer/*.whl || exit 3
    OURS_PP=/tmp/site-ours:/tmp/site:$REPO
    PEER_PP=/tmp/site-peer:/tmp/site
    PYTHONPATH=$OURS_PP python3 -c "import deepspeed, open_clip, accelerate, webdataset, clipkit.train.loop; print('ours imports ok', deepspeed.__version__, open_clip.__version__, webdataset.__version__)" 2>&1 | grep -v Warning | tail -3
    PYTHONPATH=$PEER_PP python3 -c "import open_clip_train.main, webdataset; print('peer imports ok', webdataset.__version__)" 2>&1 | tail -3
    WORKERS=${GPU_TRAIN_WORKERS:-14}
    ARGS=(--model ViT-B-32 --image-size 224 --batch-size 256 --steps 100 --skip 20 --workers "$WORKERS"
          --accelerate-config train/accelerate/gpu_zero2.yaml --precision bf16
          --peer-precision "${GPU_TRAIN_PEER_PRECISION:-amp_bf16,pure_bf16}" --peak-tflops 989 --timeout 150)
fi
stamp "benchmark: ${ARGS[*]}"
PYTHONPATH=$OURS_PP $PY bench/train_throughput.py "${ARGS[@]}" --work-dir "$WORK" --json-out "$OUT/result.json" \
    --ours-env "PYTHONPATH=$OURS_PP" --peer-env "PYTHONPATH=$PEER_PP" --peer-python "$PEER_PY" --python "$PY" \
    --gen-procs "$(nproc)" 2>&1 | tee "$OUT/bench.log"
RC=${PIPESTATUS[0]}
stamp "benchmark exited $RC"
# logs of each run and our per-step metrics (at most 8 files come back from $OUT)
for f in "$WORK"/ours-0.log "$WORK"/peer-*-0.log; do [ -f "$f" ] && tail -c 400000 "$f" > "$OUT/$(basename "$f")"; done
[ -f "$WORK/ours-0/metrics.jsonl" ] && cp "$WORK/ours-0/metrics.jsonl" "$OUT/ours_metrics.jsonl"
stamp "done"
exit "$RC"
