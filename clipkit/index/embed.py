"""Image and caption embeddings of every sample of a set of shards, one part per shard, resumable.

Output directory (clip-retrieval's embedding-folder names, so its tools and autofaiss read it too):
    embed_run.json                    model fingerprint, shard list and settings; a rerun must match it
    img_emb/img_emb_NNNNN.npy         [n, D] float16, L2-normalised image embeddings of part NNNNN (= shard NNNNN)
    text_emb/text_emb_NNNNN.npy       [n, D] float16, L2-normalised caption embeddings, same rows
    parts/NNNNN.json                  the part's completion marker (rows, rejects by reason), written last
    metadata/metadata_NNNNN.parquet   id, shard, key, caption, url, width, height, offset, size, json extras
    embeddings.json                   written once every part is complete: per-part rows and first ids, totals

A part is complete when its marker exists, absent otherwise (every file is written to a temporary name and renamed),
so a killed run continues where it stopped. A sample's `id` is its row in the concatenation of the parts in order;
ids are only known once every part is complete, so `finalize` writes the metadata files from the parts' tables.
Reruns give byte-identical files: the batches of a part do not depend on the number of ranks or workers.

Samples go through the training loader's rules (`clipkit.data.wds`): a raw sample without an image, with a missing or
non-UTF-8 caption, an unreadable image or a decompression bomb (header checked before decoding) is skipped and
counted under its reason; a truncated shard keeps the samples before the break.
"""

import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.data.tar_stream import ERROR_KEY, iter_shard
from clipkit.data.urls import url_scheme
from clipkit.data.wds import CAPTION_MAX_CHARS, IMAGE_KEYS, SampleSkipped, sample_caption, sample_image_bytes
from clipkit.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image

RUN_FILE = "embed_run.json"
EMBEDDINGS_FILE = "embeddings.json"
# Fixed metadata columns; every top-level key of a sample's json that is not one of them is copied as an extra column.
BASE_COLUMNS = ("id", "shard", "key", "caption", "url", "width", "height", "offset", "size", "image_ext")


def part_name(part: int) -> str:
    return f"{part:05d}"


def part_files(out: Path, part: int) -> Dict[str, Path]:
    p = part_name(part)
    return {"image": out / "img_emb" / f"img_emb_{p}.npy", "text": out / "text_emb" / f"text_emb_{p}.npy",
            "table": out / "parts" / f"{p}.parquet", "marker": out / "parts" / f"{p}.json",
            "metadata": out / "metadata" / f"metadata_{p}.parquet"}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


def member_offsets(url: str) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """key -> {extension: (byte offset of the member's data, size)} of a local uncompressed tar; {} otherwise.

    `GET /images/{id}` serves an image by reading exactly these bytes, so the service never opens a path that a
    request names. A truncated tar keeps the members before the break.
    """
    from webdataset.tariterators import base_plus_ext

    from clipkit.data.tar_stream import META_MEMBER, unsafe_member_name

    if url_scheme(url) not in ("", "file") or not url.endswith(".tar"):
        return {}
    path = url[len("file://"):] if url.startswith("file://") else url
    out: Dict[str, Dict[str, Tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg() or META_MEMBER.match(info.name) or unsafe_member_name(info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is not None:
                    out.setdefault(prefix, {}).setdefault(suffix.lower(), (info.offset_data, info.size))
    except (tarfile.TarError, EOFError, OSError):
        pass
    return out


def _json_extras(raw: Dict[str, Any]) -> Dict[str, Any]:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except ValueError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {str(k): v for k, v in meta.items() if str(k) not in BASE_COLUMNS}


def _source_url(extras: Dict[str, Any]) -> str | None:
    for key in ("url", "source"):
        if isinstance(extras.get(key), str):
            return extras[key]
    return None


class PartStream(IterableDataset):
    """Batches of the parts given to this process; each DataLoader worker reads whole parts (parts[w::W]).

    Yields {"part", "image": [B, 3, H, W], "text": [B, L] long, "meta": B dicts}, and after a part's last batch
    {"part", "end": True, "counts": {reason: n}} ("ok" included).
    """

    def __init__(self, parts: Sequence[Tuple[int, str]], preprocess: Callable, tokenizer: Callable, batch_size: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, caption_max_chars: int = CAPTION_MAX_CHARS):
        self.parts = list(parts)
        self.preprocess, self.tokenizer, self.batch_size = preprocess, tokenizer, batch_size
        self.max_pixels, self.caption_max_chars = max_pixels, caption_max_chars

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        mine = self.parts if info is None else self.parts[info.id::info.num_workers]
        for part, url in mine:
            yield from self.part_batches(part, url)

    def decode(self, raw: Dict[str, Any], offsets: Dict[str, Dict[str, Tuple[int, int]]]) -> tuple:
        """(image tensor, caption, metadata row) of a raw sample, or SampleSkipped(reason)."""
        if ERROR_KEY in raw:
            raise SampleSkipped(raw[ERROR_KEY])
        data = sample_image_bytes(raw)
        caption = sample_caption(raw, self.caption_max_chars)
        try:
            image = decode_image(data, max_pixels=self.max_pixels)
        except ImageRejected as e:
            raise SampleSkipped(e.reason) from e
        ext = next(k for k in IMAGE_KEYS if k in raw)
        offset, size = offsets.get(raw["__key__"], {}).get(ext, (-1, -1))
        extras = _json_extras(raw)
        meta = {"shard": raw["__url__"], "key": raw["__key__"], "caption": caption, "url": _source_url(extras),
                "width": image.width, "height": image.height, "offset": offset, "size": size, "image_ext": ext,
                **extras}
        return self.preprocess(image), caption, meta

    def part_batches(self, part: int, url: str) -> Iterator[Dict[str, Any]]:
        counts: Counter = Counter()
        offsets = member_offsets(url)
        images: List[torch.Tensor] = []
        captions: List[str] = []
        metas: List[Dict[str, Any]] = []
        for raw in iter_shard(url):
            try:
                image, caption, meta = self.decode(raw, offsets)
            except SampleSkipped as e:
                counts[e.reason] += 1
                continue
            counts["ok"] += 1
            images.append(image)
            captions.append(caption)
            metas.append(meta)
            if len(images) == self.batch_size:
                yield {"part": part, "image": torch.stack(images), "text": self.tokenizer(captions), "meta": metas}
                images, captions, metas = [], [], []
        if images:
            yield {"part": part, "image": torch.stack(images), "text": self.tokenizer(captions), "meta": metas}
        yield {"part": part, "end": True, "counts": dict(counts)}


def _column(values: List[Any]) -> List[Any]:
    """A column pyarrow can type: one scalar kind (None allowed) stays, anything else becomes JSON strings."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) <= 1 and not kinds & {dict, list}:
        return values
    if kinds <= {int, float}:
        return [None if v is None else float(v) for v in values]
    return [None if v is None else json.dumps(v, sort_keys=True) for v in values]


def metadata_table(metas: List[Dict[str, Any]]):
    """A pyarrow table of a part's metadata rows (without ids): base columns first, extras sorted by name."""
    import pyarrow as pa

    names = [c for c in BASE_COLUMNS if c != "id"]
    names += sorted({k for m in metas for k in m} - set(names))
    columns = {n: _column([m.get(n) for m in metas]) for n in names}
    types = {"shard": pa.string(), "key": pa.string(), "caption": pa.string(), "url": pa.string(),
             "width": pa.int64(), "height": pa.int64(), "offset": pa.int64(), "size": pa.int64(),
             "image_ext": pa.string()}
    return pa.table({n: pa.array(v, type=types.get(n)) for n, v in columns.items()})


@dataclass
class EmbedSettings:
    batch_size: int = 256  # samples per forward (per part: a part's last batch may be smaller)
    workers: int = 2  # DataLoader processes per rank (decode + resize)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    caption_max_chars: int = CAPTION_MAX_CHARS


class Encoder:
    """Both towers of a model on one device, under the chosen precision; outputs float32, L2-normalised."""

    def __init__(self, model: torch.nn.Module, device: Any, precision: str):
        self.model, self.device = model.to(device).eval(), torch.device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        import torch.nn.functional as F

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            img = self.model.encode_image(images.to(self.device, non_blocking=True))
            txt = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        return img.cpu().numpy(), txt.cpu().numpy()


def _save_npy(path: Path, x: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, x.astype(np.float16))


def write_part(out: Path, part: int, url: str, img: np.ndarray, txt: np.ndarray, metas: List[Dict[str, Any]],
               counts: Dict[str, int]) -> None:
    import pyarrow.parquet as pq

    files = part_files(out, part)
    _atomic_write(files["image"], lambda p: _save_npy(p, img))
    _atomic_write(files["text"], lambda p: _save_npy(p, txt))
    _atomic_write(files["table"], lambda p: pq.write_table(metadata_table(metas), p))
    write_json(files["marker"], {"part": part, "shard": url, "rows": int(len(img)), "dim": int(img.shape[1]),
                                 "rejected": {k: v for k, v in sorted(counts.items()) if k != "ok"}})


def part_complete(out: Path, part: int) -> bool:
    files = part_files(out, part)
    return files["marker"].is_file() and (files["table"].is_file() or files["metadata"].is_file())


def embed_parts(encoder: Encoder, parts: Sequence[Tuple[int, str]], out: Path, preprocess: Callable,
                tokenizer: Callable, settings: EmbedSettings, dim: int, progress: bool = True,
                total_samples: int | None = None) -> Dict[str, int]:
    """Embeds the parts not yet complete; returns the counts by reason of those embedded now."""
    from tqdm import tqdm

    todo = [(p, u) for p, u in parts if not part_complete(out, p)]
    totals: Counter = Counter()
    if not todo:
        return dict(totals)
    stream = PartStream(todo, preprocess, tokenizer, settings.batch_size, settings.max_pixels,
                        settings.caption_max_chars)
    workers = min(settings.workers, len(todo))
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if workers else None)
    urls = dict(todo)
    pending: Dict[int, Dict[str, list]] = {}
    with tqdm(total=total_samples, desc="embed", unit="sample", disable=not progress) as bar:
        for item in loader:
            acc = pending.setdefault(item["part"], {"img": [], "txt": [], "meta": []})
            if item.get("end"):
                img = np.concatenate(acc["img"]) if acc["img"] else np.zeros((0, dim), np.float32)
                txt = np.concatenate(acc["txt"]) if acc["txt"] else np.zeros((0, dim), np.float32)
                write_part(out, item["part"], urls[item["part"]], img, txt, acc["meta"], item["counts"])
                totals.update(item["counts"])
                bar.update(sum(v for k, v in item["counts"].items() if k != "ok"))
                del pending[item["part"]]
                continue
            img, txt = encoder(item["image"], item["text"])
            acc["img"].append(img)
            acc["txt"].append(txt)
            acc["meta"].extend(item["meta"])
            bar.update(len(img))
    return dict(totals)


def finalize(out: Path, shards: Sequence[str]) -> Dict[str, Any]:
    """Once every part is complete: metadata files with global ids, then embeddings.json. Idempotent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [p for p in range(len(shards)) if not part_complete(out, p)]
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {len(shards)} parts are not embedded yet (first: part {missing[0]},"
                         f" {shards[missing[0]]}); rerun index/embed.py with the same arguments to finish")
    parts, first_id, rejected = [], 0, Counter()
    for p, url in enumerate(shards):
        files = part_files(out, p)
        marker = json.loads(files["marker"].read_text())
        if not files["metadata"].is_file():
            table = pq.read_table(files["table"])
            ids = pa.array(np.arange(first_id, first_id + table.num_rows, dtype=np.int64))
            _atomic_write(files["metadata"], lambda path, t=table.add_column(0, "id", ids): pq.write_table(t, path))
        if files["table"].is_file():
            files["table"].unlink()
        parts.append({"part": p, "shard": url, "rows": marker["rows"], "first_id": first_id})
        rejected.update(marker["rejected"])
        first_id += marker["rows"]
    run = json.loads((out / RUN_FILE).read_text())
    summary = {"model": run["model"], "fingerprint": run["fingerprint"], "dim": run["dim"], "count": first_id,
               "parts": parts,
               "rejected": dict(sorted(rejected.items())), "dtype": "float16", "normalized": True}
    write_json(out / EMBEDDINGS_FILE, summary)
    return summary


def check_run(out: Path, run: Dict[str, Any]) -> None:
    """A rerun into an existing output must use the same model, shards and settings that change the numbers."""
    path = out / RUN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diffs = [k for k in ("fingerprint", "dim", "shards", "settings") if old.get(k) != run.get(k)]
    if diffs:
        raise ValueError(f"{out} holds embeddings made with other settings ({', '.join(diffs)} differ): rerun with the "
                         "same arguments to resume, or pick a new --output")


def write_arrays(out: str | Path, image: np.ndarray, text: np.ndarray, model: Dict[str, Any],
                 rows_per_part: int = 1 << 20, captions: Sequence[str] | None = None) -> Dict[str, Any]:
    """An embedding directory from arrays made elsewhere ([N, D] each, L2-normalised; stored float16), in the layout
    `embed_parts` writes: e.g. the 1M random vectors of the index scale benchmark. `model` is the identity a service
    will check (its "fingerprint" above all)."""
    out = Path(out)
    n, dim = image.shape
    if text.shape != image.shape:
        raise ValueError(f"image {image.shape} and text {text.shape} embeddings differ in shape")
    starts = list(range(0, n, rows_per_part)) or [0]
    shards = [f"arrays:{i}" for i in range(len(starts))]
    write_json(out / RUN_FILE, {"fingerprint": model["fingerprint"], "model": model, "dim": int(dim),
                                "shards": shards, "settings": {}})
    for p, start in enumerate(starts):
        rows = range(start, min(n, start + rows_per_part))
        metas = [{"shard": shards[p], "key": f"{i:09d}", "caption": captions[i] if captions else None,
                  "offset": -1, "size": -1} for i in rows]
        write_part(out, p, shards[p], image[rows.start:rows.stop], text[rows.start:rows.stop], metas, {})
    return finalize(out, shards)
