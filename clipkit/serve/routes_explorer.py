"""The explorer page (`/`, static files) and the data only it needs: the map, a point's neighbours, zero-shot labels.

Everything else the page shows comes from the same API other clients use (/knn-service, /metadata, /images/{id}).
The page's HTML, JS and CSS load without a key; these data routes are guarded like every API route.
"""

import base64
from pathlib import Path
from typing import Any, Dict, List

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from clipkit.serve.body import json_body, openapi_body
from clipkit.serve.errors import APIError

router = APIRouter(prefix="/explorer", tags=["explorer"])
MAX_CATEGORIES = 64  # a string column with more distinct values is not offered for colouring
ZEROSHOT_TEMPLATES = ("a photo of a {}.",)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _categorical_columns(table) -> Dict[str, Dict[str, Any]]:
    """Columns to colour the map by: strings with 2..MAX_CATEGORIES distinct values (class, split, source...)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name in ("caption", "key", "url", "shard", "image_ext") or not pa.types.is_string(col.type):
            continue
        labels = [v for v in pc.unique(col).to_pylist() if v is not None]
        if not 2 <= len(labels) <= MAX_CATEGORIES:
            continue
        labels = sorted(labels)
        lookup = {v: i for i, v in enumerate(labels)}
        codes = np.array([lookup.get(v, 65535) for v in col.to_pylist()], dtype="<u2")
        out[name] = {"labels": labels, "codes": _b64(codes)}
    return out


@router.get("/map")
async def explorer_map(request: Request) -> Dict[str, Any]:
    """The 2-D map (float32 x, y in [0, 1], base64, row i = id i) and the categorical columns as uint16 codes."""
    from clipkit.index.projection import read_map

    svc = request.app.state.service
    cached = getattr(request.app.state, "explorer_map", None)
    if cached is not None:  # the index does not change while served: build the answer once
        return cached
    xy, info = await anyio.to_thread.run_sync(read_map, svc.index.dir)
    if xy is None:
        raise APIError(404, "this index has no map: build it with index/build.py (without --no-map)",
                       code="no_map")
    columns = await anyio.to_thread.run_sync(_categorical_columns, svc.index.store.metadata())
    request.app.state.explorer_map = {"count": int(len(xy)), "method": info["method"], "xy": _b64(xy.astype("<f4")),
                                      "columns": columns, "index": svc.index.name}
    return request.app.state.explorer_map


class NeighborsRequest(BaseModel):
    id: int
    k: int = Field(12, ge=1)


@router.post("/neighbors", openapi_extra=openapi_body(NeighborsRequest))
async def neighbors(request: Request, req: NeighborsRequest = Depends(json_body(NeighborsRequest))) -> Dict:
    """A stored image's nearest images (image -> image) and captions (image -> text)."""
    svc = request.app.state.service
    svc.check_id(req.id, "id")
    if req.k > svc.config.max_results:
        raise APIError(400, f"k: at most {svc.config.max_results} (--max-results)", "k")
    query = svc.embeddings("image", [req.id])[0]
    out: Dict[str, List[Dict[str, Any]]] = {}
    for modality in ("image", "text"):
        scores, ids = await svc.search(modality, query, req.k + (modality == "image"))
        pairs = [(int(i), float(s)) for i, s in zip(ids, scores) if not (modality == "image" and i == req.id)]
        metas = svc.metadata([i for i, _ in pairs[:req.k]])
        out[modality] = [{**m, "id": i, "similarity": s} for (i, s), m in zip(pairs, metas)]
    return out


class ZeroShotRequest(BaseModel):
    classnames: List[str] = Field(..., min_length=2)
    templates: List[str] = Field(default_factory=lambda: list(ZEROSHOT_TEMPLATES))
    label_column: str | None = None  # metadata column holding the true class name, for the confusion matrix


@router.post("/zeroshot", openapi_extra=openapi_body(ZeroShotRequest))
async def zeroshot(request: Request, req: ZeroShotRequest = Depends(json_body(ZeroShotRequest))) -> Dict:
    """Each image's predicted class among `classnames` (prompt-ensembled text classifier, as in CLIP), and the
    confusion matrix against `label_column` where its values are among the class names."""
    svc = request.app.state.service
    names = [c.strip() for c in req.classnames if c.strip()]
    if not 2 <= len(names) <= svc.config.max_inputs or len(set(names)) != len(names):
        raise APIError(400, f"classnames: give 2..{svc.config.max_inputs} distinct names", "classnames")
    if not req.templates or any("{}" not in t for t in req.templates) or len(req.templates) * len(names) > 4096:
        raise APIError(400, "templates: each must contain {} (at most 4096 prompts in all)", "templates")
    prompts = [t.format(c) for c in names for t in req.templates]
    if any(len(p) > svc.config.max_text_chars for p in prompts):
        raise APIError(400, f"classnames: a prompt is over {svc.config.max_text_chars} characters", "classnames")
    text = (await svc.embed("text", prompts)).reshape(len(names), len(req.templates), -1).mean(1)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def predict() -> np.ndarray:
        preds = [np.argmax(chunk @ text.T, axis=1) for chunk in svc.index.store.chunks("image")]
        return np.concatenate(preds).astype("<u2") if preds else np.zeros(0, "<u2")

    pred = await anyio.to_thread.run_sync(predict)
    out: Dict[str, Any] = {"classnames": names, "pred": _b64(pred)}
    table = svc.index.store.metadata()
    if req.label_column:
        if req.label_column not in table.column_names:
            raise APIError(400, f"label_column: no column {req.label_column!r}", "label_column")
        truth = table.column(req.label_column).to_pylist()
        lookup = {n: i for i, n in enumerate(names)}
        confusion = np.zeros((len(names), len(names)), dtype=np.int64)
        for t, p in zip(truth, pred):
            if t in lookup:
                confusion[lookup[t], p] += 1
        total = int(confusion.sum())
        out.update(confusion=confusion.tolist(), labelled=total,
                   accuracy=float(np.trace(confusion) / total) if total else None)
    return out


def mount_static(app: FastAPI, static_dir: Path) -> None:
    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(static_dir / "index.html")
