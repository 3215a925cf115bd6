"""Fashion-MNIST from its idx files (Debian's `dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist).

The idx format (LeCun's MNIST format): a big-endian header `0x0000 <dtype> <ndim>` then one uint32 per dimension,
then the raw array. Files may be gzipped. Nothing is downloaded.
"""

import gzip
import struct
from pathlib import Path
from typing import Tuple

import numpy as np

# The 10 classes in label order (Xiao et al. 2017, "Fashion-MNIST", Table 1).
FASHION_MNIST_CLASSNAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Reads one idx file (plain or .gz) into a numpy array of its stored shape and dtype."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4].hex()})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx dtype code 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    count = int(np.prod(shape))
    body = data[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: idx header says {shape} ({count * dtype.itemsize} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root}/{stem}[.gz] not found: point fashion-mnist:DIR at the idx files "
        "(`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)")


def load_fashion_mnist(root: str, split: str = "test") -> Tuple[np.ndarray, np.ndarray]:
    """Returns (images [N, 28, 28] uint8, labels [N] int64) of the `train` (60k) or `test` (10k) split."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    root_path = Path(root)
    images = read_idx(_find(root_path, f"{SPLIT_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root_path, f"{SPLIT_PREFIX[split]}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def write_idx(path: Path, array: np.ndarray) -> None:
    """Writes `array` (uint8) as an idx file, gzipped when `path` ends in .gz (used by tests to make small sets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
