"""JSON request bodies parsed whatever the Content-Type says, validated by the route's pydantic model.

clip-retrieval's `ClipClient` (requests' `data=`) and its web front (fetch with a string body: text/plain) send JSON
without a JSON content type, as clip-back's `get_json(force=True)` accepts; curl's `-d` sends a form type. FastAPI
would refuse those bodies, so the POST routes take `Depends(json_body(Model))` instead, and declare the schema for
/docs with `json_schema_extra(Model)`.
"""

import json
from typing import Any, Callable, Dict, Type

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from clipkit.serve.errors import APIError


def json_body(model: Type[BaseModel]) -> Callable:
    async def parse(request: Request) -> BaseModel:
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"body: not valid JSON ({e})", "body") from e
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e

    return parse


def openapi_body(model: Type[BaseModel]) -> Dict[str, Any]:
    """`openapi_extra` that documents `model` as the route's JSON body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
