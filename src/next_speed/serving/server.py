"""09: the HTTP server (FastAPI + uvicorn) over one shared SentenceGenerator.

`POST /generate` {"prompt", "max_sentences", "params", "plan"} returns the text, the sentences, the
planned and realized tuples and the request's timings (`queued`: seconds before its first step).
The OpenAI-compatible API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, streamed or
not; openai_api.py), the code browser (`GET /v1/codes/{level}/{index}`, `POST /v1/codes/encode`),
a web page at `/` (web/index.html) and Prometheus metrics at `/metrics` are served beside it.
Bodies over MAX_BODY_BYTES get a 413 before any handler reads them.
Concurrent requests share decoder batches (scheduler.py); over MAX_QUEUE requests in flight, a
request gets an immediate 503 with a Retry-After header. `GET /health` is 503 until the models are loaded, then 200. Every
limit is a knob; invalid requests get a 4xx JSON error naming the field; a bug is a JSON 500,
logged with its traceback, and the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model of /generate,
# built per app, from the handler's live annotation.
import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from next_speed.core.config import knob
from next_speed.core.errors import NextSpeedError

log = logging.getLogger(__name__)


def request_models(max_n_cand: int, max_new_tokens_cap: int, max_sentences_cap: int):
    """The request body of POST /generate as a typed model built from the generation knobs: every
    value of `params` is checked for its type (strictly: no "30" for a count, no boolean for a
    number), its finite range and the server's caps, with the field's name in the error."""
    from typing import Annotated, Optional

    from pydantic import ConfigDict, create_model, model_validator

    from next_speed.core.config import fields_of
    from next_speed.generation.generate import GenParams

    caps = {"n_cand": max_n_cand, "max_new_tokens": max_new_tokens_cap}
    fields: dict[str, Any] = {}
    for f, tp, _ in fields_of(GenParams):
        if f.name == "gen_steps":
            continue
        m = f.metadata
        hi = m.get("max") if f.name not in caps else min(caps[f.name], m.get("max") or caps[f.name])
        extra = {"allow_inf_nan": False} if tp is float else {}
        fields[f.name] = (
            Optional[Annotated[tp, Field(strict=True, ge=m.get("min"), le=hi, description=m.get("help"), **extra)]],
            None,
        )

    def no_gen_steps(cls, data):
        if isinstance(data, dict) and "gen_steps" in data:
            raise ValueError("gen_steps: set the number of sentences with max_sentences")
        return data

    Params = create_model(
        "GenerationParams",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"no_gen_steps": model_validator(mode="before")(no_gen_steps)},
        **fields,
    )

    class GenerateRequest(BaseModel):
        """Body of POST /generate."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(..., strict=True, description="text to continue (one or more sentences)")
        max_sentences: int = Field(3, strict=True, ge=1, le=max_sentences_cap, description="sentences to generate")
        params: Params = Field(default_factory=Params, description="per-call overrides of the generation knobs")
        plan: list[Any] | None = Field(
            None, description="plan control: per sentence null, codes, an example sentence or an object"
        )

    return GenerateRequest


@dataclass
class ServerConfig:
    """09 knobs (the generation knobs of step 07 apply too)."""

    host: str = knob("127.0.0.1", env="HOST", help="address to bind")
    port: int = knob(8000, env="PORT", min=1, max=65535, help="port to bind")
    model_name: str = knob(
        "next-speed", env="MODEL_NAME", help="the model id of the OpenAI-compatible API (GET /v1/models)"
    )
    max_prompt_chars: int = knob(4000, env="MAX_PROMPT_CHARS", min=1, help="longest accepted prompt")
    max_body_bytes: int = knob(
        65536, env="MAX_BODY_BYTES", min=1024, help="largest accepted request body (413 over it)"
    )
    max_sentences_cap: int = knob(8, env="MAX_SENTENCES_CAP", min=1, help="largest accepted max_sentences")
    max_n_cand: int = knob(16, env="MAX_N_CAND", min=1, help="largest accepted params.n_cand")
    max_new_tokens_cap: int = knob(128, env="MAX_NEW_TOKENS_CAP", min=1, help="largest accepted params.max_new_tokens")
    max_choices: int = knob(
        4, env="MAX_CHOICES", min=1, help="largest accepted n (choices) of the OpenAI-compatible API"
    )
    max_queue: int = knob(
        32, env="MAX_QUEUE", min=1, help="requests in flight at most; over it, an immediate 503 with Retry-After"
    )
    max_batch_rows: int = knob(
        64,
        env="MAX_BATCH_ROWS",
        min=1,
        help="candidate rows per decoder batch across concurrent requests (continuous batching)",
    )
    retry_after: int = knob(2, env="RETRY_AFTER", min=1, help="seconds a refused client is told to wait (Retry-After)")


def _error_body(path: str, status: int, msg: str, param: str | None = None) -> dict:
    """The spec's `{"error": msg}` for its own endpoints, OpenAI's envelope under /v1."""
    from next_speed.serving.openai_api import envelope

    return envelope(status, msg, param) if path.startswith("/v1") else {"error": msg}


_BODY_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/codes/encode")


async def _await_or_disconnect(request, futs: list):
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


class _Guard:
    """Pure ASGI middleware: refuses bodies over `limit` bytes with a 413 before any handler reads
    them (declared or chunked), and counts every answer by route and status for /metrics."""

    def __init__(self, app, limit: int, count: Callable[[str, int], None]):
        self.app, self.limit, self.count = app, limit, count

    async def __call__(self, scope, receive, send):
        import json as _json

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
                payload = _json.dumps(
                    _error_body(path, 413, f"request body is over the limit of {self.limit} bytes (MAX_BODY_BYTES)")
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


class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, queue_len: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter(
            "nextspeed_requests", "HTTP requests answered, by route and status", ["endpoint", "status"], registry=reg
        )
        self.errors = Counter(
            "nextspeed_errors", "HTTP requests answered with a 4xx or 5xx status", ["endpoint", "status"], registry=reg
        )
        self.sentences = Counter("nextspeed_sentences", "sentences generated", registry=reg)
        self.tokens = Counter("nextspeed_tokens", "decoder tokens of the generated sentences", registry=reg)
        self.queue = Gauge("nextspeed_queue_length", "generation requests in flight (waiting or running)", registry=reg)
        self.queue.set_function(queue_len)
        self.stage = Histogram(
            "nextspeed_stage_seconds",
            "latency per stage: prompt, planner, decoder and rerank per sentence step; queued and total per generation",
            ["stage"],
            registry=reg,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def record(self, res) -> None:
        """Count one finished generation's sentences, tokens and stage latencies."""
        for st in res.steps:
            for stage in ("planner", "decoder", "rerank"):
                if stage in st.timings:
                    self.stage.labels(stage).observe(st.timings[stage])
            if st.chosen is not None:
                self.tokens.inc(st.tokens)
        self.sentences.inc(len(res.sentences))
        for stage in ("prompt", "queued", "total"):
            if stage in res.timings:
                self.stage.labels(stage).observe(res.timings[stage])


def create_app(load: Callable[[], Any], scfg: ServerConfig | None = None, background: bool = True):
    """The FastAPI app. `load()` builds the generator (in a thread when `background`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from next_speed.serving import openai_api as oa
    from next_speed.serving.openai_api import ApiError

    scfg = scfg or ServerConfig()
    state: dict[str, Any] = {"gen": None, "error": None, "sched": None}
    started = int(time.time())
    metrics = _Metrics(lambda: state["sched"].load() if state["sched"] is not None else 0)

    def _load():
        try:
            gen = load()
            if gen is not None:
                from next_speed.serving.scheduler import BatchScheduler

                state["sched"] = BatchScheduler(gen, scfg.max_queue, scfg.max_batch_rows)
            state["gen"] = gen
        except Exception as e:  # noqa: BLE001 - reported by /health and /generate
            state["error"] = str(e)
            log.error("could not load the generator: %s", e)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if background:
            threading.Thread(target=_load, daemon=True).start()
        else:
            _load()
        yield
        if state.get("sched") is not None:
            state["sched"].close()

    app = FastAPI(title="next-speed", description="Sentence-step text generation", lifespan=lifespan)
    app.add_middleware(_Guard, limit=scfg.max_body_bytes, count=metrics.count)

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": msg})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(
            status_code=exc.status_code,
            content=_error_body(request.url.path, exc.status_code, str(exc.detail)),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [x for x in first.get("loc", ()) if x not in ("body", "path", "query")]
        # a union's members show up in the location (e.g. "list[int]"): keep names and indices only
        loc = [
            x
            for x in loc
            if isinstance(x, int)
            or (
                "[" not in str(x) and not str(x)[:1].isupper() and str(x) not in ("str", "int", "float", "bool", "none")
            )
        ]
        where = ""
        for x in loc:  # plan[0][1] and messages[2].role, as check_plan names them
            where += f"[{x}]" if isinstance(x, int) else (f".{x}" if where else str(x))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        v1 = request.url.path.startswith("/v1")
        if first.get("type") == "json_invalid":
            where, msg = (
                "body",
                f"invalid JSON ({first.get('ctx', {}).get('error', 'cannot parse')} at character {loc[0] if loc else 0})",
            )
        if first.get("type") == "extra_forbidden":
            from next_speed.serving.openai_api import UNSUPPORTED

            msg = "not supported by next-speed" if loc and loc[-1] in UNSUPPORTED else "unknown field"
        knob = {
            "params.n_cand": "MAX_N_CAND",
            "params.max_new_tokens": "MAX_NEW_TOKENS_CAP",
            "max_sentences": "MAX_SENTENCES_CAP",
        }.get(where)
        if knob and first.get("type") == "less_than_equal":
            msg += f" ({knob})"
        if v1:
            return JSONResponse(status_code=400, content=oa.envelope(400, f"{where or 'body'}: {msg}", where or None))
        return error(422, f"{where or 'body'}: {msg}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: log it with its traceback, answer JSON, keep serving.
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            status_code=500,
            content=_error_body(
                request.url.path, 500, f"internal error ({type(exc).__name__}); the server log has the details"
            ),
        )

    @app.get("/health")
    async def health():  # async: answered on the event loop, never queued behind generations
        if state["gen"] is not None:
            g = state["gen"]
            return {"status": "ok", "device": getattr(g, "device", None), "dtype": getattr(g, "dtype", None)}
        if state["error"]:
            return error(503, f"models failed to load: {state['error']}")
        return error(503, "loading models")

    @app.get("/metrics")
    async def prom_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return HTMLResponse(files("next_speed.serving").joinpath("web/index.html").read_text(encoding="utf-8"))

    GenerateRequest = request_models(scfg.max_n_cand, scfg.max_new_tokens_cap, scfg.max_sentences_cap)

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        from next_speed.generation.generate import check_prompt

        if len(req.prompt) > scfg.max_prompt_chars:
            return error(
                413,
                f"prompt: {len(req.prompt)} characters is over the limit of {scfg.max_prompt_chars} (MAX_PROMPT_CHARS)",
            )
        try:
            check_prompt(req.prompt)
        except NextSpeedError as e:
            return error(422, str(e))
        params = req.params.model_dump(exclude_none=True)
        gen = state["gen"]
        if gen is None:
            return error(
                503, "models are still loading" if not state["error"] else f"models failed to load: {state['error']}"
            )
        from next_speed.serving.scheduler import QueueFull, ShuttingDown

        try:
            fut = state["sched"].submit(req.prompt, req.max_sentences, plan=req.plan, **params)
            got = await _await_or_disconnect(request, [fut])
        except (QueueFull, ShuttingDown) as e:
            return JSONResponse(
                status_code=503, content={"error": str(e)}, headers={"Retry-After": str(scfg.retry_after)}
            )
        except NextSpeedError as e:
            return error(422, str(e))
        if got is None:
            return error(499, "the client closed the connection")
        res = got[0]
        metrics.record(res)
        return {
            "text": res.text,
            "sentences": res.sentences,
            "planned": res.planned,
            "realized": res.realized,
            "stop_reason": res.stop_reason,
            "timings": res.timings,
        }

    # ------------------------------------------------------------------ OpenAI-compatible API
    def ready():
        gen = state["gen"]
        if gen is None:
            msg = "models are still loading" if not state["error"] else f"models failed to load: {state['error']}"
            raise ApiError(503, msg, headers={"Retry-After": str(scfg.retry_after)})
        return gen

    def model_card(gen) -> dict:
        return {
            "id": scfg.model_name,
            "object": "model",
            "created": started,
            "owned_by": "next-speed",
            "next_speed": {
                "K": gen.rvq.K,
                "V": gen.rvq.V,
                "code_mode": gen.cond.code_mode,
                "max_sentences_cap": scfg.max_sentences_cap,
                "max_n_cand": scfg.max_n_cand,
                "defaults": asdict(gen.params),
            },
        }

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(ready())]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        gen = ready()
        if model_id != scfg.model_name:
            raise ApiError(
                404,
                f"model {model_id!r} does not exist; this server serves {scfg.model_name!r}",
                "model",
                "model_not_found",
            )
        return model_card(gen)

    def config_error(e: NextSpeedError) -> ApiError:
        """A generation's own error as the API answers it: busy or shutting down is a 503 with
        Retry-After, anything else about the request a 400 naming the field."""
        import re

        from next_speed.serving.scheduler import QueueFull, ShuttingDown

        if isinstance(e, (QueueFull, ShuttingDown)):
            return ApiError(503, str(e), headers={"Retry-After": str(scfg.retry_after)})
        msg = str(e)
        head = re.match(r"([A-Za-z_][\w.\[\]]*)[=:]", msg)  # "plan[0][1]: ..." or "top_p=0.001 is ..."
        return ApiError(400, msg, head.group(1) if head else None)

    def submit_all(kws: list[dict], prompt: str, on_step=None) -> list:
        """Queue the request's choices (all or none: a full queue refuses the whole request)."""
        from next_speed.serving.scheduler import QueueFull, ShuttingDown

        futs = []
        try:
            for i, kw in enumerate(kws):
                kw = dict(kw)
                futs.append(
                    state["sched"].submit(
                        prompt,
                        kw.pop("max_sentences"),
                        plan=kw.pop("plan"),
                        max_tokens=kw.pop("max_tokens"),
                        stop=kw.pop("stop"),
                        on_step=on_step(i) if on_step else None,
                        **kw,
                    )
                )
        except (QueueFull, ShuttingDown) as e:
            for f in futs:
                f.cancel()
            raise ApiError(503, str(e), headers={"Retry-After": str(scfg.retry_after)}) from e
        except NextSpeedError as e:
            for f in futs:
                f.cancel()
            raise config_error(e) from e
        return futs

    async def complete(kind: str, req, prompt: str, request: Request):
        gen = ready()
        if req.model != scfg.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} does not exist; this server serves {scfg.model_name!r}",
                "model",
                "model_not_found",
            )
        if len(prompt) > scfg.max_prompt_chars:
            raise ApiError(
                400,
                f"prompt: {len(prompt)} characters is over the limit of {scfg.max_prompt_chars} (MAX_PROMPT_CHARS)",
                "messages" if kind == "chat" else "prompt",
                "context_length_exceeded",
            )
        if req.n > scfg.max_choices:
            raise ApiError(400, f"n: {req.n} is over the limit of {scfg.max_choices} (MAX_CHOICES)", "n")
        if req.n_cand is not None and req.n_cand > scfg.max_n_cand:
            raise ApiError(400, f"n_cand: {req.n_cand} is over the limit of {scfg.max_n_cand} (MAX_N_CAND)", "n_cand")
        kws, _ = oa.generation_kwargs(req, gen.params.seed, scfg.max_sentences_cap)
        rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
        prompt_tokens = len(gen.tok(prompt, add_special_tokens=False)["input_ids"])
        if not req.stream:
            futs = submit_all(kws, prompt)
            try:
                results = await _await_or_disconnect(request, futs)
            except NextSpeedError as e:
                raise config_error(e) from e
            if results is None:
                return JSONResponse(status_code=499, content=oa.envelope(499, "the client closed the connection"))
            for r in results:
                metrics.record(r)
            return oa.completion_object(kind, rid, scfg.model_name, results, prompt_tokens, req.return_candidates)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        futs = submit_all(kws, prompt, on_step=lambda i: lambda st: put((i, st)))
        for i, f in enumerate(futs):
            f.add_done_callback(lambda f, i=i: put((i, None)))
        created = int(time.time())

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            pending, written, tokens = set(range(len(futs))), [0] * len(futs), 0
            try:
                if kind == "chat":
                    for i in range(len(futs)):
                        yield sse(oa.chunk(kind, rid, scfg.model_name, created, i, "", role=True))
                while pending:
                    i, st = await queue.get()
                    if st is not None:
                        if st.chosen is not None and st.sentence:
                            sep = "" if kind == "chat" and not written[i] else " "
                            written[i] += 1
                            yield sse(
                                oa.chunk(
                                    kind,
                                    rid,
                                    scfg.model_name,
                                    created,
                                    i,
                                    sep + st.sentence,
                                    extra={"sentence": oa.sentence_info(st, req.return_candidates)},
                                )
                            )
                        continue
                    pending.discard(i)
                    f = futs[i]
                    if f.cancelled():
                        continue
                    exc = f.exception()
                    if exc is not None:
                        if isinstance(exc, NextSpeedError):
                            err = config_error(exc)
                        else:
                            log.error("a streamed generation failed", exc_info=exc)
                            err = ApiError(
                                500, f"internal error ({type(exc).__name__}); the server log has the details"
                            )
                        metrics.errors.labels("stream", str(err.status)).inc()
                        yield sse(err.body())
                        continue
                    res = f.result()
                    metrics.record(res)
                    tokens += oa.completion_tokens(res)
                    extra = {"stop_reason": res.stop_reason, "timings": res.timings}
                    body = oa.chunk(
                        kind, rid, scfg.model_name, created, i, None, oa.FINISH.get(res.stop_reason, "stop"), extra
                    )
                    if not pending:
                        body["usage"] = oa.usage(prompt_tokens, tokens)
                    yield sse(body)
                yield "data: [DONE]\n\n"
            finally:
                for f in futs:
                    f.cancel()  # the client went away: its generations leave the batch

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/completions")
    async def completions(req: oa.CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(
                    400, f"prompt: one prompt per request (got {len(prompt)}); use n for several choices", "prompt"
                )
            prompt = prompt[0]
        from next_speed.generation.generate import check_prompt

        try:
            check_prompt(prompt)
        except NextSpeedError as e:
            raise ApiError(400, str(e), "prompt") from e
        return await complete("text", req, prompt, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: oa.ChatRequest, request: Request):
        from next_speed.generation.generate import check_prompt

        prompt = oa.chat_prompt(req.messages)
        try:
            check_prompt(prompt, "messages")
        except NextSpeedError as e:
            raise ApiError(400, str(e), "messages") from e
        return await complete("chat", req, prompt, request)

    # ------------------------------------------------------------------ the code browser
    @app.get("/v1/codes/{level}/{index}")
    async def code_info(
        level: int, index: int, n: int = Query(8, ge=1, le=100), neighbours: int = Query(5, ge=0, le=50)
    ):
        gen = ready()
        if not (0 <= level < gen.rvq.K and 0 <= index < gen.rvq.V):
            raise ApiError(
                404,
                f"no code ({level}, {index}): levels are 0 to {gen.rvq.K - 1}, codes 0 to {gen.rvq.V - 1}",
                "level" if not 0 <= level < gen.rvq.K else "index",
                "code_not_found",
            )
        try:
            browser = await run_in_threadpool(gen.browser)
        except NextSpeedError as e:
            raise ApiError(503, str(e), code="browser_unavailable") from e
        return await run_in_threadpool(browser.lookup, level, index, n, neighbours)

    class EncodeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: StrictStr = Field(..., description="a sentence to embed and quantize")

    @app.post("/v1/codes/encode")
    async def encode_text(req: EncodeRequest):
        from next_speed.generation.generate import check_prompt

        gen = ready()
        try:
            check_prompt(req.text, "text")
        except NextSpeedError as e:
            raise ApiError(400, str(e), "text") from e
        if len(req.text) > scfg.max_prompt_chars:
            raise ApiError(
                400, f"text: over the limit of {scfg.max_prompt_chars} characters (MAX_PROMPT_CHARS)", "text"
            )

        def run():
            with gen._lock:
                return gen.codes_of(req.text)

        return {"text": req.text, "codes": await run_in_threadpool(run)}

    app.state.gen_state = state
    app.state.metrics = metrics
    return app


def main(argv: list[str] | None = None) -> int:
    import argparse

    from next_speed.cli import guarded
    from next_speed.core.config import add_arguments, from_namespace, resolve
    from next_speed.core.runtime import setup_logging
    from next_speed.generation.generate import GenerateConfig, SentenceGenerator

    ap = argparse.ArgumentParser(prog="09_server.py", description="Serve the sentence-step generator over HTTP.")
    add_arguments(ap, ServerConfig)
    add_arguments(ap, GenerateConfig)
    ns = ap.parse_args(argv)

    def go():
        import uvicorn

        setup_logging(False)
        scfg = resolve(ServerConfig, from_namespace(ns, ServerConfig))
        gcfg = resolve(GenerateConfig, from_namespace(ns, GenerateConfig))
        app = create_app(lambda: SentenceGenerator(gcfg), scfg)
        log.info("serving on http://%s:%d", scfg.host, scfg.port)
        uvicorn.run(app, host=scfg.host, port=scfg.port, log_level="info")

    return guarded(go)
