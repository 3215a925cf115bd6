"""Request and response shapes, one pydantic model per route (FastAPI validates them and documents them at /docs)."""

from typing import Any, Dict, List, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# ---- errors (OpenAI's shape, on every route) -------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str  # invalid_request_error | authentication_error | not_found_error | server_error
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- POST /v1/embeddings ---------------------------------------------------------------------------------------


class TextItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str


class ImageItem(BaseModel):
    """An image: `image` as a data: URI (or bare base64), or `url` (http/https, only with --allow-url-fetch).
    OpenAI's chat-content spelling `{"type": "image_url", "image_url": {"url": ...}}` is accepted too."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image", "image_url"]
    image: str | None = None
    url: str | None = None
    image_url: Union[ImageURL, str, None] = None


InputItem = Union[str, TextItem, ImageItem]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `user` and other OpenAI fields are accepted and ignored
    input: Union[str, List[Union[InputItem, int, List[int]]]] = Field(
        description="a string, or a list of strings / {type: text|image} items; strings that are "
                    "data:image/...;base64, URIs are images")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[List[float], str]  # base64 of little-endian float32 with encoding_format=base64


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: List[Embedding]
    model: str
    usage: Usage


# ---- GET /v1/models --------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "clipkit"
    fingerprint: str
    dim: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


# ---- clip-retrieval: POST /knn-service, POST /metadata, GET /indices-list --------------------------------------


class KnnRequest(BaseModel):
    """clip-retrieval's knn-service body. use_mclip, use_safety_model, use_violence_detector and the aesthetic
    fields are accepted for compatibility; there are no such models here, so they change nothing (as in clip-back
    started without them)."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = None  # base64 image bytes
    image_url: str | None = None  # only with --allow-url-fetch
    embedding_input: List[float] | None = None
    modality: Literal["image", "text"] = "image"  # which index to search
    num_images: int | None = Field(None, ge=1)  # results returned; default min(40, --max-results)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    deduplicate: bool = True
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Union[int, str, None] = None
    aesthetic_weight: Union[float, str, None] = None


class KnnResult(BaseModel):
    model_config = ConfigDict(extra="allow")  # the index's metadata columns (key, class, ...)
    id: int
    similarity: float
    caption: str | None = None
    url: str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: List[int]
    indice_name: str | None = None


class MetadataItem(BaseModel):
    id: int
    metadata: Dict[str, Any]


# ---- GET /health -----------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    index: str
    count: int
    dim: int
    model_fingerprint: str
    backend: str  # torch | onnxruntime
    auth_required: bool  # whether the API routes need `Authorization: Bearer KEY`
