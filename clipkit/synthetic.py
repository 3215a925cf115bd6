"""The embedded default data set: coloured shapes with captions, generated on the fly (no downloads).

30 classes (6 colours x 5 shapes), each image a shape of random size, position and rotation on a random light
background with noise. Training captions use varied phrasings; zero-shot evaluation uses prompts the model never saw
("a photo of a {c}."), and a few colour-shape combinations are held out of training entirely, so the demo measures
both generalisation to new images and to new combinations.
"""

import io
import json
import math
import random
import tarfile
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "star")
CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]
# One combination per colour, every shape at least once: never in the training captions.
HELD_OUT = ("red star", "green circle", "blue square", "yellow triangle", "purple cross", "orange star")
CAPTION_TEMPLATES = (
    "a {c} {s}", "a {c} {s} on a plain background", "a picture of a {c} {s}", "{c} {s}",
    "a drawing of a {s} coloured {c}", "a {s} that is {c}", "one {c} {s}", "a small {c} {s}",
)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float = 1.0) -> List[Tuple[float, float]]:
    pts = []
    steps = n * (2 if inner != 1.0 else 1)
    for i in range(steps):
        rr = r if i % 2 == 0 or inner == 1.0 else r * inner
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(color: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    fill = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r, 4, rot), fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, rot), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            d.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                       (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    return img


def samples(n: int, seed: int, classes: Sequence[str], size: int = 64) -> Iterable[Tuple[Image.Image, str, str]]:
    """Yields (image, caption, class name) with random classes from `classes`."""
    rng = random.Random(seed)
    for _ in range(n):
        cls = rng.choice(classes)
        color, shape = cls.split(" ")
        caption = rng.choice(CAPTION_TEMPLATES).format(c=color, s=shape)
        yield draw_shape(color, shape, size, rng), caption, cls


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_train_shards(out_dir, n: int, per_shard: int = 1000, seed: int = 0, size: int = 64) -> List[str]:
    """Training shards (jpg + txt + json) over the non-held-out classes; returns the shard paths. Also writes
    open_clip's sizes.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_classes = [c for c in CLASSES if c not in HELD_OUT]
    paths, sizes, tar, count = [], {}, None, 0
    for i, (img, caption, cls) in enumerate(samples(n, seed, train_classes, size)):
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            paths.append(str(out_dir / f"{len(paths):05d}.tar"))
            tar = tarfile.open(paths[-1], "w")
            sizes[Path(paths[-1]).name] = 0
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        key = f"{i:09d}"
        _add(tar, f"{key}.jpg", buf.getvalue())
        _add(tar, f"{key}.txt", caption.encode())
        _add(tar, f"{key}.json", json.dumps({"class": cls}).encode())
        sizes[Path(paths[-1]).name] += 1
        count += 1
    if tar is not None:
        tar.close()
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return paths


def write_eval_folder(out_dir, n: int, seed: int = 1, classes: Sequence[str] = CLASSES, size: int = 64) -> Path:
    """An image-folder eval set (`folder:DIR`): a sub-folder for each of the 30 classes (the candidates of the
    zero-shot classifier), images drawn from `classes` only."""
    out_dir = Path(out_dir)
    for cls in CLASSES:
        (out_dir / cls).mkdir(parents=True, exist_ok=True)
    for i, (img, _, cls) in enumerate(samples(n, seed, list(classes), size)):
        img.save(out_dir / cls / f"{i:06d}.png")
    return out_dir
