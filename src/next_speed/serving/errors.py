"""One mapping from the project's errors to HTTP answers, for every surface of the server.

Native endpoints answer the spec's `{"error": msg}`; everything under `/v1` answers OpenAI's
envelope `{"error": {"message", "type", "param", "code"}}`. Routes raise `ApiError` (or let a
`NextSpeedError` through `api_error`) and the handlers installed by `install_error_handlers`
pick the body by path. Busy or shutting down is a 503 with Retry-After; a bug is a JSON 500,
logged with its traceback, and the server keeps serving.
"""

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from next_speed.core.errors import NextSpeedError
from next_speed.serving.protocol import UNSUPPORTED
from next_speed.serving.scheduler import QueueFull, ShuttingDown

log = logging.getLogger(__name__)

# A knob that caps a request field: named in the error when a request goes over it.
CAPS = {
    "params.n_cand": "MAX_N_CAND",
    "params.max_new_tokens": "MAX_NEW_TOKENS_CAP",
    "max_sentences": "MAX_SENTENCES_CAP",
}


class ApiError(Exception):
    """An HTTP error answer: status, message, the request field it is about, a machine code."""

    TYPES = {
        400: "invalid_request_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
        500: "server_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self, path: str = "/v1") -> dict:
        return error_body(path, self.status, self.message, self.param, self.code)


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    error = {"message": message, "type": ApiError.TYPES.get(status, "invalid_request_error"), "param": param}
    return {"error": {**error, "code": code}}


def error_body(path: str, status: int, msg: str, param: str | None = None, code: str | None = None) -> dict:
    """The spec's `{"error": msg}` for its own endpoints, OpenAI's envelope under /v1."""
    return envelope(status, msg, param, code) if path.startswith("/v1") else {"error": msg}


def busy(e: Exception, retry_after: int) -> ApiError:
    """Busy or shutting down: a 503 the client is told to retry after `retry_after` seconds."""
    return ApiError(503, str(e), headers={"Retry-After": str(retry_after)})


def api_error(e: NextSpeedError, retry_after: int, status: int = 400) -> ApiError:
    """A generation's own error as the server answers it: busy or shutting down is a 503 with
    Retry-After, anything else about the request `status` naming the field the message starts with."""
    if isinstance(e, (QueueFull, ShuttingDown)):
        return busy(e, retry_after)
    msg = str(e)
    head = re.match(r"([A-Za-z_][\w.\[\]]*)[=:]", msg)  # "plan[0][1]: ..." or "top_p=0.001 is ..."
    return ApiError(status, msg, head.group(1) if head else None)


def check_length(text: str, field: str, limit: int, status: int = 400, code: str | None = None) -> None:
    """Refuse a prompt (or text) longer than MAX_PROMPT_CHARS, naming the field and the knob."""
    if len(text) > limit:
        msg = f"{field}: {len(text)} characters is over the limit of {limit} (MAX_PROMPT_CHARS)"
        raise ApiError(status, msg, field, code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    """(where, message) of a request's first validation error: `plan[0][1]`, `messages[2].role`."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [x for x in first.get("loc", ()) if x not in ("body", "path", "query")]
    # a union's members show up in the location (e.g. "list[int]"): keep names and indices only
    types = ("str", "int", "float", "bool", "none")
    loc = [x for x in loc if isinstance(x, int) or ("[" not in str(x) and not str(x)[:1].isupper() and x not in types)]
    where = ""
    for x in loc:
        where += f"[{x}]" if isinstance(x, int) else (f".{x}" if where else str(x))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "cannot parse")
        where, msg = "body", f"invalid JSON ({reason} at character {loc[0] if loc else 0})"
    if first.get("type") == "extra_forbidden":
        msg = "not supported by next-speed" if loc and loc[-1] in UNSUPPORTED else "unknown field"
    if CAPS.get(where) and first.get("type") == "less_than_equal":
        msg += f" ({CAPS[where]})"
    return where, msg


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise, answered as JSON in the surface's own format."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content=exc.body(request.url.path), headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        body = error_body(request.url.path, exc.status_code, str(exc.detail))
        return JSONResponse(status_code=exc.status_code, content=body, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        where, msg = _validation_message(exc)
        # OpenAI's clients expect 400 for a bad request; the spec's own endpoints answer 422
        status = 400 if request.url.path.startswith("/v1") else 422
        body = error_body(request.url.path, status, f"{where or 'body'}: {msg}", where or None)
        return JSONResponse(status_code=status, content=body)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: log it with its traceback, answer JSON, keep serving.
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        msg = f"internal error ({type(exc).__name__}); the server log has the details"
        return JSONResponse(status_code=500, content=error_body(request.url.path, 500, msg))
