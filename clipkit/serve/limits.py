"""Request body cap (ASGI middleware): a body over `max_bytes` is answered 413 before any route sees it.

The declared Content-Length is checked first; a body without one (chunked) is read up to the cap and refused as soon
as it passes it, so a client cannot make the service buffer more than `max_bytes`.
"""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _send_413(send: Send, max_bytes: int) -> None:
    body = json.dumps({"error": {"message": f"request body over {max_bytes} bytes (--max-body-bytes)",
                                 "type": "invalid_request_error", "param": None, "code": "body_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the server (h11) rejects a malformed length itself
            if too_big:
                return await _send_413(send, self.max_bytes)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_413(send, self.max_bytes)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
