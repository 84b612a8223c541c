"""ASGI pieces of the server: the body-size guard (413 before any handler reads an oversized body,
and the per-route answer counts of /metrics) and waiting on generations while watching the client."""

import asyncio
import json
from collections.abc import Callable

from next_speed.serving.errors import error_body

_BODY_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/codes/encode")


async def await_or_disconnect(request, futs: list):
    """The futures' results; when the client goes away first, the futures are cancelled (the
    scheduler drops them at its next round) and None is returned. Starlette does not cancel a
    handler whose client disconnected, so without this a gone client's generation would run on."""
    waiter = asyncio.ensure_future(asyncio.gather(*[asyncio.wrap_future(f) for f in futs]))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                return None
    finally:
        for f in futs:
            f.cancel()
        if not waiter.done():
            waiter.cancel()


class BodyGuard:
    """Pure ASGI middleware: refuses bodies over `limit` bytes with a 413 before any handler reads
    them (declared or chunked), and counts every answer by route and status for /metrics."""

    def __init__(self, app, limit: int, count: Callable[[str, int], None]):
        self.app, self.limit, self.count = app, limit, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        path = scope.get("path", "")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            declared = dict(scope.get("headers") or []).get(b"content-length")
            body, more = b"", True
            too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
            while more and not too_big:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                too_big = len(body) > self.limit
            if too_big:
                payload = json.dumps(
                    error_body(path, 413, f"request body is over the limit of {self.limit} bytes (MAX_BODY_BYTES)")
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                self.count(path if path in _BODY_ROUTES else "other", 413)  # bounded labels: routes, never raw paths
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            receive_next = replay
        else:
            receive_next = receive
        try:
            await self.app(scope, receive_next, send_counted)
        finally:
            route = scope.get("route")
            self.count(getattr(route, "path", None) or "other", status["code"])
