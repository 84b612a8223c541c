"""09: the HTTP server (FastAPI + uvicorn) over one shared SentenceGenerator.

`POST /generate` {"prompt", "max_sentences", "params"} returns the text, the sentences and the
planned and realized tuples. `GET /health` is 503 until the models are loaded, then 200. Every
limit is a knob; invalid requests get a 4xx JSON error, never a 500.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, Field

from .config import knob
from .errors import NextSpeedError

log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    """Body of POST /generate."""

    prompt: str = Field(..., description="text to continue (one or more sentences)")
    max_sentences: int = Field(3, description="sentences to generate")
    params: dict[str, Any] = Field(default_factory=dict, description="per-call overrides of the generation knobs "
                                   "(gen_steps excepted): n_cand, rerank, do_sample, top_p, temp, max_new_tokens, "
                                   "plan_temp, plan_top_k, seed")


@dataclass
class ServerConfig:
    """09 knobs (the generation knobs of step 07 apply too)."""

    host: str = knob("127.0.0.1", env="HOST", help="address to bind")
    port: int = knob(8000, env="PORT", min=1, max=65535, help="port to bind")
    max_prompt_chars: int = knob(4000, env="MAX_PROMPT_CHARS", min=1, help="longest accepted prompt")
    max_sentences_cap: int = knob(8, env="MAX_SENTENCES_CAP", min=1, help="largest accepted max_sentences")
    max_n_cand: int = knob(16, env="MAX_N_CAND", min=1, help="largest accepted params.n_cand")
    max_new_tokens_cap: int = knob(128, env="MAX_NEW_TOKENS_CAP", min=1, help="largest accepted params.max_new_tokens")


def create_app(load: Callable[[], Any], scfg: ServerConfig | None = None, background: bool = True):
    """The FastAPI app. `load()` builds the generator (in a thread when `background`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    scfg = scfg or ServerConfig()
    state: dict[str, Any] = {"gen": None, "error": None}

    def _load():
        try:
            state["gen"] = load()
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

    app = FastAPI(title="next-speed", description="Sentence-step text generation", lifespan=lifespan)

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": msg})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.get("/health")
    def health():
        if state["gen"] is not None:
            return {"status": "ok"}
        if state["error"]:
            return error(503, f"models failed to load: {state['error']}")
        return error(503, "loading models")

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        if not req.prompt.strip():
            return error(422, "prompt: must not be empty")
        if len(req.prompt) > scfg.max_prompt_chars:
            return error(413, f"prompt: {len(req.prompt)} characters is over the limit of {scfg.max_prompt_chars} (MAX_PROMPT_CHARS)")
        if not 1 <= req.max_sentences <= scfg.max_sentences_cap:
            return error(422, f"max_sentences: must be between 1 and {scfg.max_sentences_cap} (MAX_SENTENCES_CAP)")
        params = dict(req.params)
        if "gen_steps" in params:
            return error(422, "params.gen_steps: set the number of sentences with max_sentences")
        if "n_cand" in params and isinstance(params["n_cand"], int) and params["n_cand"] > scfg.max_n_cand:
            return error(422, f"params.n_cand: must be at most {scfg.max_n_cand} (MAX_N_CAND)")
        if "max_new_tokens" in params and isinstance(params["max_new_tokens"], int) and params["max_new_tokens"] > scfg.max_new_tokens_cap:
            return error(422, f"params.max_new_tokens: must be at most {scfg.max_new_tokens_cap} (MAX_NEW_TOKENS_CAP)")
        gen = state["gen"]
        if gen is None:
            return error(503, "models are still loading" if not state["error"] else f"models failed to load: {state['error']}")
        try:
            res = await run_in_threadpool(gen.run, req.prompt, req.max_sentences, **params)
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
