"""clip-retrieval's back-end API: `POST /knn-service`, `POST /metadata`, `GET /indices-list`.

Its `ClipClient` and its web front send JSON without a JSON content type (requests' `data=`, fetch's text/plain), as
clip-back's `get_json(force=True)` accepts; so these routes parse the body as JSON whatever the content type says.
Results are `{id, similarity, caption, url, ...metadata}`; `url` is the sample's source URL when it has an http(s)
one, else this service's `/images/{id}`.
"""

from typing import Any, Dict, List

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request

from clipkit.serve.body import json_body, openapi_body
from clipkit.serve.errors import APIError
from clipkit.serve.inputs import decode_base64_image, fetch_image_bytes
from clipkit.serve.schemas import KnnRequest, KnnResult, MetadataItem, MetadataRequest

router = APIRouter(tags=["clip-retrieval-compatible"])
DEDUP_THRESHOLD = 0.94  # clip-retrieval's: results whose embeddings are this similar are one image


def _check_indice(svc, name: str | None) -> None:
    if name not in (None, "", svc.index.name):
        raise APIError(404, f"indice_name: no index {name!r} here; GET /indices-list lists [{svc.index.name!r}]",
                       "indice_name", code="unknown_index")


def dedup(ids: np.ndarray, embeddings: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Keeps a result unless its embedding is >= threshold similar to a better-ranked kept one."""
    keep: List[int] = []
    for i in range(len(ids)):
        if all(float(embeddings[i] @ embeddings[j]) < threshold for j in keep):
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


async def query_vector(svc, req: KnnRequest) -> np.ndarray:
    """The [D] query: text first, then image, then image_url, then embedding_input (clip-back's order)."""
    if req.text:
        if len(req.text) > svc.config.max_text_chars:
            raise APIError(400, f"text: {len(req.text)} characters, at most {svc.config.max_text_chars}", "text",
                           code="text_too_long")
        return (await svc.embed("text", [req.text]))[0]
    if req.image or req.image_url:
        param = "image" if req.image else "image_url"
        if req.image:
            data = await anyio.to_thread.run_sync(decode_base64_image, req.image, param)
        else:
            data = await anyio.to_thread.run_sync(fetch_image_bytes, req.image_url, svc.fetcher, param)
        tensors = await svc.image_tensors([data], [param])
        return (await svc.embed("image", tensors))[0]
    if req.embedding_input is not None:
        q = np.asarray(req.embedding_input, dtype=np.float32)
        if q.shape != (svc.encoder.dim,) or not np.all(np.isfinite(q)):
            raise APIError(400, f"embedding_input: expected {svc.encoder.dim} finite numbers, got {q.size}",
                           "embedding_input")
        return q
    raise APIError(400, "give one of text, image (base64), image_url or embedding_input", "text")


def result_url(svc, request: Request, i: int, meta: Dict[str, Any]) -> str:
    url = meta.get("url")
    if isinstance(url, str) and url.lower().startswith(("http://", "https://")):
        return url
    return f"{str(request.base_url).rstrip('/')}/images/{i}"


@router.post("/knn-service", response_model=List[KnnResult], response_model_exclude_none=True,
             openapi_extra=openapi_body(KnnRequest))
async def knn_service(request: Request, req: KnnRequest = Depends(json_body(KnnRequest))) -> List[Dict[str, Any]]:
    svc = request.app.state.service
    _check_indice(svc, req.indice_name)
    limit = svc.config.max_results
    num_images = req.num_images or min(40, limit)
    wanted = max(req.num_result_ids or num_images, num_images)
    if wanted > limit:
        raise APIError(400, f"num_images / num_result_ids: at most {limit} (--max-results)", "num_images")
    query = await query_vector(svc, req)
    scores, ids = await svc.search(req.modality, query, wanted)
    if req.deduplicate and len(ids):
        keep = dedup(ids, svc.embeddings(req.modality, ids))
        scores, ids = scores[keep], ids[keep]
    # As clip-back: every one of the num_result_ids results (after deduplication) comes back, the first num_images
    # with their metadata, the rest as {id, similarity}; clip-retrieval's front asks /metadata for those as the
    # user scrolls.
    metas = svc.metadata([int(i) for i in ids[:num_images]])
    out = []
    for n, (i, s) in enumerate(zip(ids, scores)):
        if n < len(metas):
            meta = metas[n]
            meta["url"] = result_url(svc, request, int(i), meta)
            out.append({**meta, "id": int(i), "similarity": float(s)})
        else:
            out.append({"id": int(i), "similarity": float(s)})
    return out


@router.post("/metadata", response_model=List[MetadataItem], openapi_extra=openapi_body(MetadataRequest))
async def metadata(request: Request, req: MetadataRequest = Depends(json_body(MetadataRequest))) -> List[Dict]:
    svc = request.app.state.service
    _check_indice(svc, req.indice_name)
    if len(req.ids) > svc.config.max_results:
        raise APIError(400, f"ids: {len(req.ids)} ids, at most {svc.config.max_results} (--max-results)", "ids")
    for n, i in enumerate(req.ids):
        svc.check_id(i, f"ids[{n}]")
    metas = svc.metadata(req.ids)
    for i, meta in zip(req.ids, metas):
        meta["url"] = result_url(svc, request, i, meta)
    return [{"id": i, "metadata": m} for i, m in zip(req.ids, metas)]


@router.get("/indices-list", response_model=List[str])
async def indices_list(request: Request) -> List[str]:
    return [request.app.state.service.index.name]
