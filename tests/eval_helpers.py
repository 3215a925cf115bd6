"""Helpers for the eval tests: small data sets in every supported layout, a stub model whose answers are known, and a
random clipkit-tiny export."""

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


def color_image(name: str, size: int = 16, seed: int = 0) -> Image.Image:
    """A solid image of a named colour with a little noise (so files differ)."""
    rng = np.random.default_rng(seed)
    base = np.array(COLORS[name], dtype=np.int16)
    arr = np.clip(base + rng.integers(-10, 11, size=(size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write_color_folder(root: Path, per_class: int = 4, misplaced: int = 1) -> Path:
    """folder layout: root/{blue,green,red}/*.png; `misplaced` blue images are filed under red (known errors)."""
    for c in COLORS:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color_image(c, seed=i).save(root / c / f"{i}.png")
    for i in range(misplaced):
        color_image("blue", seed=100 + i).save(root / "red" / f"wrong{i}.png")
    return root


def write_wds(root: Path, samples: Sequence[Dict[str, bytes]], split: str = "test", per_shard: int = 4,
              classnames: Sequence[str] = (), templates: Sequence[str] = (), dataset_type: str = "") -> Path:
    """CLIP_benchmark's wds layout: root/split/{0..N-1}.tar + nshards.txt, classnames.txt, templates, type."""
    import webdataset as wds

    (root / split).mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / split / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, s in enumerate(samples):
            sink.write({"__key__": f"s{i:07d}", **s})
    n = len(list((root / split).glob("*.tar")))
    (root / split / "nshards.txt").write_text(f"{n}\n")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root


def color_wds_samples(per_class: int = 3) -> List[Dict[str, bytes]]:
    names = sorted(COLORS)
    return [{"png": png_bytes(color_image(c, seed=i)), "cls": str(k).encode()}
            for i in range(per_class) for k, c in enumerate(names)]


def write_fashion_idx(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped idx files: class k is a 28x28 image with a bright k-th row band (learnable by a probe)."""
    from clipkit.eval.fashion_mnist import write_idx

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k: 4 + 2 * k, :] = 250
        ext = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))
    return root


class ColorTokenizer:
    """Texts -> [N, 1] ids of the colour word they mention (0 = none)."""

    names = ("red", "green", "blue")

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        ids = [next((i + 1 for i, c in enumerate(self.names) if c in t), 0) for t in texts]
        return torch.tensor(ids).view(-1, 1)


class ColorModel(nn.Module):
    """encode_image: mean RGB of the (un-normalised) image; encode_text: the RGB direction of the colour word. So
    zero-shot classification of colour images is exact, and a misfiled image is a known error."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(4, 3)
        for i, c in enumerate(ColorTokenizer.names):
            table[i + 1] = torch.tensor(COLORS[c], dtype=torch.float32) / 255.0
        self.table = nn.Parameter(table)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)) - 0.35  # centre the colours so they point in distinct directions

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]] - 0.35


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)


class Wrapper(nn.Module):
    """Stands for DDP / DeepSpeed: the model sits in `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def export_tiny(out: Path, seed: int = 0) -> Path:
    """A random clipkit-tiny exported in open_clip format; returns the export dir (out/final)."""
    from clipkit.models import create_model, export_open_clip, preprocess_cfg_of

    torch.manual_seed(seed)
    net, cfg, *_ = create_model("clipkit-tiny")
    return export_open_clip(net.state_dict(), cfg, preprocess_cfg_of(net), out / "final")


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
