"""OpenAI-compatible `POST /v1/embeddings` and `GET /v1/models`: any OpenAI client works with `base_url`.

Texts and images in one `input` list: strings are texts unless they are `data:image/...;base64,` URIs, items may be
`{"type": "text", "text"}` or `{"type": "image", "image" | "url"}` (OpenAI's `{"type": "image_url", "image_url":
{"url"}}` too). Embeddings are the model's own, L2-normalised; `encoding_format=base64` sends little-endian float32.
"""

import asyncio
import base64
from typing import Any, List, Tuple

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request

from clipkit.serve.body import json_body, openapi_body
from clipkit.serve.errors import APIError
from clipkit.serve.inputs import decode_base64_image, fetch_image_bytes, is_image_data_uri
from clipkit.serve.schemas import (
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ImageItem,
    ImageURL,
    ModelCard,
    ModelList,
    TextItem,
    Usage,
)

router = APIRouter(tags=["OpenAI-compatible"])


def _image_source(item: ImageItem, param: str) -> Tuple[str, str]:
    """("data", base64 or data URI) or ("url", http URL) of an image item."""
    given = [v for v in (item.image, item.url, item.image_url) if v is not None]
    if len(given) != 1:
        raise APIError(400, f"{param}: an image item needs exactly one of 'image' (base64 / data URI), 'url' or "
                            "'image_url'", param)
    value = given[0].url if isinstance(given[0], ImageURL) else given[0]
    if item.image is not None or value[:5].lower() == "data:":
        return "data", value
    return "url", value


def parse_inputs(req: EmbeddingsRequest, max_inputs: int, max_text_chars: int) -> List[Tuple[str, Any, str]]:
    """[(kind, value, param)]: ("text", str) or ("image", ("data" | "url", str)), in input order."""
    items = [req.input] if isinstance(req.input, str) else list(req.input)
    if not items:
        raise APIError(400, "input: empty list; send at least one string or image", "input")
    if len(items) > max_inputs:
        raise APIError(400, f"input: {len(items)} inputs, at most {max_inputs} per request (--max-inputs)", "input",
                       code="too_many_inputs")
    out = []
    for i, item in enumerate(items):
        param = "input" if isinstance(req.input, str) else f"input[{i}]"
        if isinstance(item, (int, list)):
            raise APIError(400, f"{param}: token arrays are not supported (this model has its own tokenizer); send "
                                "the text as a string", param)
        if isinstance(item, ImageItem):
            out.append(("image", _image_source(item, param), param))
            continue
        text = item.text if isinstance(item, TextItem) else item
        if isinstance(item, str) and is_image_data_uri(item):
            out.append(("image", ("data", item), param))
            continue
        if len(text) > max_text_chars:
            raise APIError(400, f"{param}: {len(text)} characters, at most {max_text_chars} (--max-text-chars)", param,
                           code="text_too_long")
        out.append(("text", text, param))
    return out


def _load_images(sources: List[Tuple[Tuple[str, str], str]], fetcher) -> List[bytes]:
    return [decode_base64_image(v, p) if how == "data" else fetch_image_bytes(v, fetcher, p)
            for (how, v), p in sources]


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, openapi_extra=openapi_body(EmbeddingsRequest))
async def embeddings(request: Request, req: EmbeddingsRequest = Depends(json_body(EmbeddingsRequest))
                     ) -> EmbeddingsResponse:
    svc = request.app.state.service
    enc = svc.encoder
    if req.model and req.model not in (enc.name, enc.fingerprint):
        raise APIError(404, f"model: {req.model!r} is not served here; GET /v1/models lists {enc.name!r}", "model",
                       code="model_not_found")
    if req.dimensions is not None and req.dimensions != enc.dim:
        raise APIError(400, f"dimensions: this model's embeddings have {enc.dim} dimensions; omit 'dimensions' or "
                            f"pass {enc.dim}", "dimensions")
    parsed = parse_inputs(req, svc.config.max_inputs, svc.config.max_text_chars)
    texts = [(i, v) for i, (k, v, _) in enumerate(parsed) if k == "text"]
    images = [(i, v, p) for i, (k, v, p) in enumerate(parsed) if k == "image"]
    jobs, tokens = [], 0
    if texts:
        strings = [v for _, v in texts]
        tokens = int(await anyio.to_thread.run_sync(lambda: int((enc.tokens(strings) != 0).sum())))
        jobs.append(svc.embed("text", strings))
    if images:
        blobs = await anyio.to_thread.run_sync(_load_images, [(v, p) for _, v, p in images], svc.fetcher)
        tensors = await svc.image_tensors(blobs, [p for _, _, p in images])
        jobs.append(svc.embed("image", tensors))
    results = await asyncio.gather(*jobs)
    rows = np.empty((len(parsed), enc.dim), np.float32)
    order = ([i for i, _ in texts] if texts else []), ([i for i, _, _ in images] if images else [])
    for positions, result in zip([o for o in order if o], results):
        rows[positions] = result
    data = []
    for i, row in enumerate(rows):
        value = (base64.b64encode(row.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else row.tolist())
        data.append(Embedding(index=i, embedding=value))
    return EmbeddingsResponse(data=data, model=enc.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    enc = request.app.state.service.encoder
    return ModelList(data=[ModelCard(id=enc.name, fingerprint=enc.fingerprint, dim=enc.dim)])
