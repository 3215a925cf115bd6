"""Dataset SPECs for evaluation, all local (nothing is downloaded):

- `folder:DIR`: one sub-folder per class (sorted folder names are the classes, `_` read as a space);
- `csv:FILE`: a header with `path` and `label` (class index or class name) and/or `caption` columns; paths relative to
  the file; several rows with the same path give an image several captions (retrieval);
- `wds:DIR[:SPLIT]`: CLIP_benchmark's WebDataset layout: `DIR/SPLIT/{0..N-1}.tar` (N in `nshards.txt`), image under
  webp/png/jpg/jpeg, class index under `cls`, captions (one per line) under `txt`; `DIR/classnames.txt`,
  `DIR/zeroshot_classification_templates.txt`; SPLIT defaults to `test`;
- `fashion-mnist:DIR[:train|test]`: the idx files of Debian's dataset-fashion-mnist; split defaults to `test`.

Every image goes through `clipkit.images.decode_image` (header size check before decoding). An image that cannot be
read is counted with its reason and skipped, never a crash: a batch carries the reasons of the samples it dropped.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from clipkit.data.tar_stream import ERROR_KEY, iter_shard
from clipkit.images import ImageRejected, decode_image

DATASET_KINDS = ("folder", "csv", "wds", "fashion-mnist")
SPEC_HELP = "folder:DIR, csv:FILE, wds:DIR[:SPLIT] or fashion-mnist:DIR[:train|test]"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
NO_LABEL = -1


@dataclass
class Batch:
    images: torch.Tensor | None  # [B, 3, H, W] float32, None when every sample of the batch was unreadable
    labels: torch.Tensor  # [B] int64, NO_LABEL where the data set has none
    captions: List[List[str] | None]  # per image, None where the data set has none
    rejected: List[str] = field(default_factory=list)  # reasons of the samples dropped from this batch


def collate(samples: Sequence[tuple]) -> Batch:
    """Samples are (image tensor or None, label, captions, reject reason)."""
    ok = [s for s in samples if s[0] is not None]
    return Batch(
        images=torch.stack([s[0] for s in ok]) if ok else None,
        labels=torch.tensor([s[1] for s in ok], dtype=torch.long),
        captions=[s[2] for s in ok],
        rejected=[s[3] for s in samples if s[0] is None],
    )


def _transformed(load: Callable[[], Image.Image], transform: Callable, label: int, captions) -> tuple:
    try:
        return transform(load()), label, captions, None
    except ImageRejected as e:
        return None, label, captions, e.reason


def _read_file(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageRejected("unreadable_file", f"{path}: {e}") from e
    return decode_image(data)


class _MapSource(Dataset):
    """Indexable samples: `load(i)` gives a PIL image; `labels[i]` and `captions[i]` the targets."""

    def __init__(self, load: Callable[[int], Image.Image], labels: List[int], captions: List[List[str]] | None):
        self.load, self.labels, self.captions = load, labels, captions
        self.transform: Callable = lambda x: x

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        captions = self.captions[i] if self.captions is not None else None
        return _transformed(lambda: self.load(i), self.transform, self.labels[i], captions)


def _wds_sample(raw: Dict[str, bytes], transform: Callable) -> tuple:
    label = int(raw["cls"].decode().strip()) if "cls" in raw else NO_LABEL
    captions = raw["txt"].decode("utf-8").splitlines() if "txt" in raw else None
    image_key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
    if image_key is None:
        return None, label, captions, "no_image"
    return _transformed(lambda: decode_image(raw[image_key]), transform, label, captions)


class _WdsSource(IterableDataset):
    """Streams samples from tar shards; DataLoader workers take disjoint shards."""

    def __init__(self, shards: List[str]):
        self.shards = shards
        self.transform: Callable = lambda x: x

    def __iter__(self):
        info = get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in shards:
            for raw in iter_shard(shard):
                if ERROR_KEY in raw:
                    # A truncated, corrupt or unreadable shard: the samples read before count, the rest is reported.
                    yield None, NO_LABEL, None, raw[ERROR_KEY]
                else:
                    yield _wds_sample(raw, self.transform)


@dataclass
class EvalDataset:
    """A data set resolved from a SPEC. `source` yields raw samples; `loader()` batches them through a transform."""

    spec: str
    source: Union[_MapSource, _WdsSource]
    classnames: List[str] | None  # index -> name; None when the data set has no class names
    templates: List[str] | None = None  # the data set's own zero-shot templates, if it ships them
    has_labels: bool = True
    has_captions: bool = False

    @property
    def num_samples(self) -> int | None:
        return len(self.source) if isinstance(self.source, _MapSource) else None

    def loader(self, transform: Callable, batch_size: int = 256, workers: int = 0,
               max_samples: int | None = None) -> DataLoader:
        """Batches of `Batch`. With `max_samples` a map-style set is cut to its first N samples (a streamed one is
        cut by the consumer, see `features.iterate_batches`)."""
        self.source.transform = transform
        data = self.source
        if max_samples is not None and isinstance(data, _MapSource):
            data = torch.utils.data.Subset(data, range(min(max_samples, len(data))))
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                          persistent_workers=False)


def read_lines(path: Union[str, Path]) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def parse_spec(spec: str) -> Tuple[str, str, str | None]:
    """`KIND:PATH[:SPLIT]` -> (kind, path, split or None)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in DATASET_KINDS or not rest:
        raise ValueError(f"unknown dataset spec {spec!r}: use {SPEC_HELP}")
    split = None
    if kind in ("wds", "fashion-mnist") and ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if tail and "/" not in tail and not Path(rest).exists():
            rest, split = head, tail
    return kind, rest, split


def _folder(root: str) -> EvalDataset:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"folder:{root}: no such directory")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"folder:{root}: no class sub-folders")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(str(f))
                labels.append(label)
    if not files:
        raise ValueError(f"folder:{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    source = _MapSource(lambda i: _read_file(files[i]), labels, None)
    return EvalDataset(f"folder:{root}", source, [d.name.replace("_", " ") for d in class_dirs])


def _csv(file: str) -> EvalDataset:
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"csv:{file}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    columns = set(rows[0]) if rows else set()
    if "path" not in columns or not columns & {"label", "caption"}:
        raise ValueError(f"csv:{file}: needs a header with a 'path' column and a 'label' and/or 'caption' column, "
                         f"has {sorted(columns)}")
    order: Dict[str, int] = {}
    raw_labels: List[str] = []
    captions: List[List[str]] = []
    for row in rows:
        p = row["path"]
        if p not in order:
            order[p] = len(order)
            raw_labels.append((row.get("label") or "").strip())
            captions.append([])
        if row.get("caption"):
            captions[order[p]].append(row["caption"])
    paths = [str(path.parent / p) for p in order]
    classnames = None
    labels = [NO_LABEL] * len(paths)
    if "label" in columns:
        if all(v.lstrip("-").isdigit() for v in raw_labels):
            labels = [int(v) for v in raw_labels]
            side = path.parent / "classnames.txt"
            classnames = read_lines(side) if side.is_file() else None
        else:
            classnames = sorted(set(raw_labels))
            index = {c: i for i, c in enumerate(classnames)}
            labels = [index[v] for v in raw_labels]
    has_captions = "caption" in columns
    source = _MapSource(lambda i: _read_file(paths[i]), labels, captions if has_captions else None)
    return EvalDataset(f"csv:{file}", source, classnames, has_labels="label" in columns, has_captions=has_captions)


def _wds(root: str, split: str | None) -> EvalDataset:
    path = Path(root).resolve()  # absolute shard paths: the shard reader's opener would run a `pipe:NAME` as a command
    split = split or "test"
    split_dir = path / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"wds:{root}: no split directory {split_dir}")
    if (split_dir / "nshards.txt").is_file():
        n = int(read_lines(split_dir / "nshards.txt")[0])
        shards = [str(split_dir / f"{i}.tar") for i in range(n)]
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"wds:{root}: nshards.txt says {n} shards, missing {missing[:3]}")
    else:
        shards = sorted(str(p) for p in split_dir.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"wds:{root}: no .tar shards in {split_dir}")
    dataset_type = read_lines(path / "dataset_type.txt")[0].lower() if (path / "dataset_type.txt").is_file() else ""
    classnames = read_lines(path / "classnames.txt") if (path / "classnames.txt").is_file() else None
    tmpl_file = path / "zeroshot_classification_templates.txt"
    templates = read_lines(tmpl_file) if tmpl_file.is_file() else None
    return EvalDataset(f"wds:{root}:{split}", _WdsSource(shards), classnames, templates,
                       has_labels=dataset_type != "retrieval", has_captions=dataset_type == "retrieval")


def _fashion_mnist(root: str, split: str | None) -> EvalDataset:
    from clipkit.eval.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist

    split = split or "test"
    images, labels = load_fashion_mnist(root, split)
    # Grayscale -> RGB by repeating the channel (what PIL's convert("RGB") does), as CLIP towers expect 3 channels.
    source = _MapSource(lambda i: Image.fromarray(images[i], mode="L").convert("RGB"), labels.tolist(), None)
    return EvalDataset(f"fashion-mnist:{root}:{split}", source, list(FASHION_MNIST_CLASSNAMES))


def build_dataset(spec: str, classnames: Union[str, Sequence[str]] | None = None) -> EvalDataset:
    """Resolves a dataset SPEC (see module doc). `classnames`: a file (one name per line) or a list that replaces the
    data set's own names; its length must match the data set's classes."""
    kind, path, split = parse_spec(spec)
    if kind == "folder":
        ds = _folder(path)
    elif kind == "csv":
        ds = _csv(path)
    elif kind == "wds":
        ds = _wds(path, split)
    else:
        ds = _fashion_mnist(path, split)
    if classnames is not None:
        names = read_lines(classnames) if isinstance(classnames, (str, Path)) else list(classnames)
        if ds.classnames is not None and len(names) != len(ds.classnames):
            raise ValueError(f"class names ({len(names)}) do not match the {len(ds.classnames)} classes of {spec}")
        ds.classnames = names
    if ds.classnames is not None and isinstance(ds.source, _MapSource) and ds.has_labels:
        top = max(ds.source.labels, default=NO_LABEL)
        if top >= len(ds.classnames):
            raise ValueError(f"{spec}: label {top} but only {len(ds.classnames)} class names")
    return ds


def check_label_range(labels: torch.Tensor, classnames: Sequence[str], spec: str) -> None:
    """For streamed sets whose labels are only seen while reading: a label past the class names is an error."""
    if len(labels) and (int(labels.max()) >= len(classnames) or int(labels.min()) < 0):
        raise ValueError(f"{spec}: label {int(labels.max())} out of range for {len(classnames)} class names "
                         "(class names file does not match the labels)")
