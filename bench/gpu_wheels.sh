#!/usr/bin/env bash
# Fetches the wheels bench/gpu_train.sh installs on the GPU machine (python 3.12, x86-64, no network there) into the
# git-ignored folder .whl/ (about 10 MiB), to be sent with the device tool's `carry: [".whl"]`.
# The machine's image already has torch, torchvision, accelerate, transformers, huggingface_hub, numpy, pandas,
# pyyaml, safetensors, tqdm, regex, psutil, ninja, py-cpuinfo, msgpack, einops, nvidia-ml-py, fsspec, tensorboard
# (/work/.library/device/KINDS.md); these are what it lacks, each dependency named (--no-deps).
#   bash bench/gpu_wheels.sh          # run here, with .venv (it builds deepspeed's wheel from its sdist)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/ours .whl/peer
PY=${PY:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, venv symlink kept
DL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# open_clip + its tokenizer's ftfy; timm >= 1.0.17 for open_clip 3.3; deepspeed's pydantic stack
"${DL[@]}" -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 braceexpand==0.1.7 hjson==3.1.0 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 timm==1.0.31
# webdataset: 1.x for clipkit, <= 0.2.86 for open_clip_train 3.3 (newer raise KeyError 'fname' in its loader)
"${DL[@]}" -d .whl/ours webdataset==1.0.2
"${DL[@]}" -d .whl/peer webdataset==0.2.86
# deepspeed ships only an sdist: build a pure-Python wheel (ops are JIT-built if ever needed; ZeRO-2 with torch's
# AdamW needs none)
WHL=$(pwd)/.whl
(cd "$(mktemp -d)" && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$WHL")
du -sh .whl
