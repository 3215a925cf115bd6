"""Pass 1: every sample's CLIP score (cosine of the model's L2-normalised image and caption embeddings) and the
facts the rules need (caption, stored image size), one `scores/NAME.parquet` per input shard.

Under `accelerate launch` each process scores its own shards (shard i goes to rank i mod world size); the main
process then waits for all of them (gloo on CPU, NCCL on GPUs) before pass 2. A shard whose scores file matches the
input file (size, mtime) and the model is not scored again, so a killed run resumes at the shard level.
"""

import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data_prep.filter.config import FilterError
from clipkit.data_prep.filter.read import HashingReader, TarSample, iter_samples
from clipkit.data_prep.writer import read_json, write_json
from clipkit.images import ImageRejected, decode_image, probe_image

SCORE_FIELDS = [
    ("key", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image_error", pa.string()),  # why the image cannot be used (missing_image, not_an_image, ...), else null
    ("clip_score", pa.float64()),  # null without a model, or when the image or caption is unusable
]


def shard_name(path: str) -> str:
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def scores_paths(scores_dir: str, name: str) -> Dict[str, str]:
    return {"parquet": os.path.join(scores_dir, f"{name}.parquet"), "meta": os.path.join(scores_dir, f"{name}.json")}


def input_identity(path: str) -> Dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def scores_are_current(path: str, scores_dir: str, model_id: Dict[str, Any]) -> bool:
    meta = read_json(scores_paths(scores_dir, shard_name(path))["meta"])
    if not meta or not os.path.exists(scores_paths(scores_dir, shard_name(path))["parquet"]):
        return False
    same_input = {k: meta["input"].get(k) for k in ("bytes", "mtime_ns")} == {
        k: v for k, v in input_identity(path).items() if k != "path"}
    return same_input and meta.get("model") == model_id


class Scorer:
    """Batched CLIP scores with a loaded model (clipkit.eval.models.LoadedModel)."""

    def __init__(self, loaded, device: Any, batch_size: int = 256, threads: int = 4):
        self.loaded, self.device, self.batch_size = loaded, device, batch_size
        self.pool = ThreadPoolExecutor(threads)

    def _prepare(self, sample: TarSample):
        """(tensor or None, reason) for one sample; runs on a worker thread (PIL releases the GIL)."""
        data = sample.image
        if data is None:
            return None, "missing_image"
        try:
            return self.loaded.preprocess(decode_image(data)), None
        except ImageRejected as e:
            return None, e.reason

    def scores(self, samples: Sequence[TarSample], captions: Sequence[str | None]) -> List[tuple]:
        """(cosine(encode_image, encode_text), None) per sample; (None, why) where the image does not decode, and
        (None, None) where the caption is empty."""
        import torch

        from clipkit.eval.features import encode_images, encode_texts

        prepared = list(self.pool.map(self._prepare, samples))
        usable = [i for i, (tensor, _) in enumerate(prepared) if tensor is not None and captions[i]]
        out: List[tuple] = [(None, reason) for _, reason in prepared]
        if usable:
            images = torch.stack([prepared[i][0] for i in usable])
            image_features = encode_images(self.loaded.model, images, self.device)
            text_features = encode_texts(self.loaded.model, self.loaded.tokenizer, [captions[i] for i in usable],
                                         self.device, batch_size=len(usable))
            cosines = (image_features * text_features).sum(dim=-1).double().cpu().tolist()
            for i, value in zip(usable, cosines):
                out[i] = (value, None)
        return out

    def close(self) -> None:
        self.pool.shutdown()


def _facts(sample: TarSample) -> Dict[str, Any]:
    """Caption and stored image size from the header (no pixel decoded)."""
    row: Dict[str, Any] = {"key": sample.key, "caption": sample.caption, "width": None, "height": None,
                           "image_error": None, "clip_score": None}
    data = sample.image
    if data is None:
        row["image_error"] = "missing_image"
        return row
    try:
        _, (row["width"], row["height"]) = probe_image(data)
    except ImageRejected as e:
        row["image_error"] = e.reason
    return row


def score_shard(path: str, scores_dir: str, scorer: Scorer | None, model_id: Dict[str, Any],
                progress: Callable[[int], None] | None = None) -> Dict[str, Any]:
    """Writes scores/NAME.parquet and scores/NAME.json (meta, last) for one input shard; returns the meta."""
    start = time.monotonic()
    rows: List[Dict[str, Any]] = []
    with open(path, "rb") as f:
        reader = HashingReader(f)
        batch: List[TarSample] = []

        def flush() -> None:
            facts = [_facts(s) for s in batch]
            if scorer is not None:
                captions = [r["caption"] if r["image_error"] is None else None for r in facts]
                for r, (value, reason) in zip(facts, scorer.scores(batch, captions)):
                    r["clip_score"] = value
                    r["image_error"] = r["image_error"] or reason
            rows.extend(facts)
            if progress is not None:
                progress(len(batch))
            batch.clear()

        try:
            for sample in iter_samples(reader):
                batch.append(sample)
                if len(batch) == (scorer.batch_size if scorer else 1024):
                    flush()
            flush()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise FilterError(f"{path}: unreadable tar ({e}); fix or leave out this shard") from e
        sha256 = reader.finish()
    paths = scores_paths(scores_dir, shard_name(path))
    table = pa.table({name: pa.array([r[name] for r in rows], dtype) for name, dtype in SCORE_FIELDS})
    tmp = f"{paths['parquet']}.tmp{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, paths["parquet"])
    meta = {"input": {**input_identity(path), "sha256": sha256}, "model": model_id, "count": len(rows),
            "duration_s": round(time.monotonic() - start, 3)}
    write_json(paths["meta"], meta)
    return meta


def read_scores(scores_dir: str, path: str) -> tuple:
    """(rows as dicts, meta) of one input shard's scores; raises FilterError when missing or stale."""
    paths = scores_paths(scores_dir, shard_name(path))
    meta = read_json(paths["meta"])
    if not meta or not os.path.exists(paths["parquet"]):
        raise FilterError(f"{scores_dir} has no scores for {path}: score it with --model (or --scores-only)")
    now = input_identity(path)
    if meta["input"]["bytes"] != now["bytes"]:
        raise FilterError(f"{path} changed since it was scored ({meta['input']['bytes']} -> {now['bytes']} bytes): "
                          "score it again")
    return pq.read_table(paths["parquet"]).to_pylist(), meta


def model_identity(model: str | None, pretrained: str | None) -> Dict[str, Any]:
    """What the scores depend on: the model spec and its weights file's size and mtime."""
    if model is None:
        return {"model": None}
    ident: Dict[str, Any] = {"model": model, "pretrained": pretrained}
    for candidate in (pretrained, os.path.join(model.removeprefix("local-dir:"), "final",
                                               "open_clip_model.safetensors"),
                      os.path.join(model.removeprefix("local-dir:"), "open_clip_model.safetensors")):
        if candidate and os.path.isfile(candidate):
            st = os.stat(candidate)
            ident["weights"] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            break
    return json.loads(json.dumps(ident))
