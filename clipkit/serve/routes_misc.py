"""`GET /images/{id}` (stored image bytes, by id only), `GET /health` (no key needed), `GET /metrics` (Prometheus)."""

import anyio
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from clipkit.serve.schemas import Health

router = APIRouter(tags=["service"])
health_router = APIRouter(tags=["service"])


@router.get("/images/{image_id}", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}})
async def image(request: Request, image_id: int = Path(..., ge=0, le=2**62)) -> Response:
    data, media = await anyio.to_thread.run_sync(request.app.state.service.read_image, image_id)
    return Response(data, media_type=media, headers={"X-Content-Type-Options": "nosniff",
                                                     "Cache-Control": "private, max-age=3600"})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@health_router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    svc = request.app.state.service
    return Health(index=svc.index.name, count=svc.count, dim=svc.encoder.dim, model_fingerprint=svc.encoder.fingerprint,
                  backend=svc.encoder.backend, auth_required=svc.config.api_key is not None)
