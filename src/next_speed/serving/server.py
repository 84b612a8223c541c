"""09: the HTTP server (FastAPI + uvicorn) over one shared SentenceGenerator.

`POST /generate` {"prompt", "max_sentences", "params", "plan"} returns the text, the sentences, the
planned and realized tuples and the request's timings (`queued`: seconds before its first step).
The OpenAI-compatible API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, streamed or
not; openai_api.py), the code browser (`GET /v1/codes/{level}/{index}`, `POST /v1/codes/encode`),
a web page at `/` (web/index.html) and Prometheus metrics at `/metrics` are served beside it.
Bodies over MAX_BODY_BYTES get a 413 before any handler reads them.
Concurrent requests share decoder batches (scheduler.py); over MAX_QUEUE requests in flight, a
request gets an immediate 503 with a Retry-After header. `GET /health` is 503 until the models are
loaded, then 200. Each surface is a router (routers/), the request and response models live in
protocol.py, and errors.py maps every error to its HTTP answer. Every limit is a knob; invalid
requests get a 4xx JSON error naming the field; a bug is a JSON 500, logged with its traceback,
and the server keeps serving.
"""

import argparse
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from next_speed.cli import guarded
from next_speed.core.config import add_arguments, from_namespace, knob, resolve
from next_speed.core.console import setup_logging
from next_speed.generation.generate import GenerateConfig, SentenceGenerator
from next_speed.serving.errors import install_error_handlers
from next_speed.serving.middleware import BodyGuard
from next_speed.serving.routers import codes, metrics, native, openai, web
from next_speed.serving.state import ServerState

log = logging.getLogger(__name__)


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


def create_app(load: Callable[[], Any], scfg: ServerConfig | None = None, background: bool = True) -> FastAPI:
    """The FastAPI app. `load()` builds the generator (in a thread when `background`): /health is
    503 until it is ready, and so is every route that needs it."""
    scfg = scfg or ServerConfig()
    state = ServerState(scfg, None)
    state.metrics = metrics.Metrics(state.queue_length)

    @asynccontextmanager
    async def lifespan(app):
        state.load(load, background)
        yield
        state.close()

    app = FastAPI(title="next-speed", description="Sentence-step text generation", lifespan=lifespan)
    app.state.server, app.state.metrics = state, state.metrics
    app.add_middleware(BodyGuard, limit=scfg.max_body_bytes, count=state.metrics.count)
    install_error_handlers(app)
    for router in (native.router(scfg), openai.router, codes.router, web.router, metrics.router):
        app.include_router(router)
    return app


def main(argv: list[str] | None = None) -> int:
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
