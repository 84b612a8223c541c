"""09: the HTTP server (FastAPI + uvicorn) over one shared SentenceGenerator.

`POST /generate` {"prompt", "max_sentences", "params"} returns the text, the sentences, the
planned and realized tuples and the request's timings (`queued`: seconds before its first step).
Concurrent requests share decoder batches (scheduler.py); over MAX_QUEUE requests in flight, a
request gets an immediate 503 with a Retry-After header. `GET /health` is 503 until the models are loaded, then 200. Every
limit is a knob; invalid requests get a 4xx JSON error naming the field; a bug is a JSON 500,
logged with its traceback, and the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model of /generate,
# built per app, from the handler's live annotation.
import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, Field

from .config import knob
from .errors import NextSpeedError

log = logging.getLogger(__name__)


def request_models(max_n_cand: int, max_new_tokens_cap: int, max_sentences_cap: int):
    """The request body of POST /generate as a typed model built from the generation knobs: every
    value of `params` is checked for its type (strictly: no "30" for a count, no boolean for a
    number), its finite range and the server's caps, with the field's name in the error."""
    from typing import Annotated, Optional

    from pydantic import ConfigDict, create_model, model_validator

    from .config import fields_of
    from .generate import GenParams

    caps = {"n_cand": max_n_cand, "max_new_tokens": max_new_tokens_cap}
    fields: dict[str, Any] = {}
    for f, tp, _ in fields_of(GenParams):
        if f.name == "gen_steps":
            continue
        m = f.metadata
        hi = m.get("max") if f.name not in caps else min(caps[f.name], m.get("max") or caps[f.name])
        extra = {"allow_inf_nan": False} if tp is float else {}
        fields[f.name] = (Optional[Annotated[tp, Field(strict=True, ge=m.get("min"), le=hi, description=m.get("help"), **extra)]], None)

    def no_gen_steps(cls, data):
        if isinstance(data, dict) and "gen_steps" in data:
            raise ValueError("gen_steps: set the number of sentences with max_sentences")
        return data

    Params = create_model("GenerationParams", __config__=ConfigDict(extra="forbid"),
                          __validators__={"no_gen_steps": model_validator(mode="before")(no_gen_steps)}, **fields)

    class GenerateRequest(BaseModel):
        """Body of POST /generate."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(..., strict=True, description="text to continue (one or more sentences)")
        max_sentences: int = Field(3, strict=True, ge=1, le=max_sentences_cap, description="sentences to generate")
        params: Params = Field(default_factory=Params, description="per-call overrides of the generation knobs")

    return GenerateRequest
@dataclass
class ServerConfig:
    """09 knobs (the generation knobs of step 07 apply too)."""

    host: str = knob("127.0.0.1", env="HOST", help="address to bind")
    port: int = knob(8000, env="PORT", min=1, max=65535, help="port to bind")
    max_prompt_chars: int = knob(4000, env="MAX_PROMPT_CHARS", min=1, help="longest accepted prompt")
    max_sentences_cap: int = knob(8, env="MAX_SENTENCES_CAP", min=1, help="largest accepted max_sentences")
    max_n_cand: int = knob(16, env="MAX_N_CAND", min=1, help="largest accepted params.n_cand")
    max_new_tokens_cap: int = knob(128, env="MAX_NEW_TOKENS_CAP", min=1, help="largest accepted params.max_new_tokens")
    max_queue: int = knob(32, env="MAX_QUEUE", min=1, help="requests in flight at most; over it, an immediate 503 with Retry-After")
    max_batch_rows: int = knob(64, env="MAX_BATCH_ROWS", min=1,
                               help="candidate rows per decoder batch across concurrent requests (continuous batching)")
    retry_after: int = knob(2, env="RETRY_AFTER", min=1, help="seconds a refused client is told to wait (Retry-After)")


def create_app(load: Callable[[], Any], scfg: ServerConfig | None = None, background: bool = True):
    """The FastAPI app. `load()` builds the generator (in a thread when `background`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    scfg = scfg or ServerConfig()
    state: dict[str, Any] = {"gen": None, "error": None}

    def _load():
        try:
            gen = load()
            if gen is not None:
                from .scheduler import BatchScheduler

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

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": msg})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        knob = {"params.n_cand": "MAX_N_CAND", "params.max_new_tokens": "MAX_NEW_TOKENS_CAP",
                "max_sentences": "MAX_SENTENCES_CAP"}.get(where)
        if knob and first.get("type") == "less_than_equal":
            msg += f" ({knob})"
        return error(422, f"{where or 'body'}: {msg}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input: log it with its traceback, answer JSON, keep serving.
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/health")
    async def health():  # async: answered on the event loop, never queued behind generations
        if state["gen"] is not None:
            return {"status": "ok"}
        if state["error"]:
            return error(503, f"models failed to load: {state['error']}")
        return error(503, "loading models")

    GenerateRequest = request_models(scfg.max_n_cand, scfg.max_new_tokens_cap, scfg.max_sentences_cap)

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        from .generate import check_prompt

        if len(req.prompt) > scfg.max_prompt_chars:
            return error(413, f"prompt: {len(req.prompt)} characters is over the limit of {scfg.max_prompt_chars} (MAX_PROMPT_CHARS)")
        try:
            check_prompt(req.prompt)
        except NextSpeedError as e:
            return error(422, str(e))
        params = req.params.model_dump(exclude_none=True)
        gen = state["gen"]
        if gen is None:
            return error(503, "models are still loading" if not state["error"] else f"models failed to load: {state['error']}")
        from .scheduler import QueueFull, ShuttingDown

        try:
            fut = state["sched"].submit(req.prompt, req.max_sentences, **params)
            res = await asyncio.wrap_future(fut)
        except (QueueFull, ShuttingDown) as e:
            return JSONResponse(status_code=503, content={"error": str(e)}, headers={"Retry-After": str(scfg.retry_after)})
        except NextSpeedError as e:
            return error(422, str(e))
        return {"text": res.text, "sentences": res.sentences, "planned": res.planned, "realized": res.realized,
                "stop_reason": res.stop_reason, "timings": res.timings}

    app.state.gen_state = state
    return app


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import guarded
    from .config import add_arguments, from_namespace, resolve
    from .generate import GenerateConfig, SentenceGenerator
    from .runtime import setup_logging

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
