"""Prometheus metrics of one app (its own registry: no process-wide state) and the request-id / timing middleware.

    clipkit_requests_total{route, method, status}   requests answered
    clipkit_errors_total{route, status}             of those, 4xx and 5xx
    clipkit_request_seconds{route}                  latency histogram
    clipkit_batch_size{kind}                        inputs per model forward (micro-batching at work)
    clipkit_inputs_total{kind}                      texts / images embedded
"""

import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("clipkit_requests_total", "Requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.errors = Counter("clipkit_errors_total", "Requests answered with 4xx or 5xx", ["route", "status"],
                              registry=self.registry)
        self.latency = Histogram("clipkit_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_size = Histogram("clipkit_batch_size", "Inputs per model forward", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.inputs = Counter("clipkit_inputs_total", "Inputs embedded", ["kind"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Gives each request an id (`X-Request-ID`, kept in scope for the error log) and records it in `metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
