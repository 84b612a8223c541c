"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(streamed as server-sent events, one per generated sentence, when `stream` is true). How the
standard fields map to generation lives in `openai_api.py`."""

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from next_speed.core.errors import NextSpeedError
from next_speed.generation.generate import check_prompt
from next_speed.serving import openai_api as oa
from next_speed.serving.errors import ApiError, api_error, check_length, envelope
from next_speed.serving.middleware import await_or_disconnect
from next_speed.serving.protocol import (
    ChatCompletionResponse,
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from next_speed.serving.state import ServerState, ready, server_state

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


def model_card(state: ServerState, gen) -> ModelCard:
    scfg = state.scfg
    return ModelCard(
        id=scfg.model_name,
        created=state.started,
        owned_by="next-speed",
        next_speed={
            "K": gen.rvq.K,
            "V": gen.rvq.V,
            "code_mode": gen.cond.code_mode,
            "max_sentences_cap": scfg.max_sentences_cap,
            "max_n_cand": scfg.max_n_cand,
            "defaults": asdict(gen.params),
        },
    )


def _unknown_model(model_id: str, served: str) -> ApiError:
    return ApiError(
        404, f"model {model_id!r} does not exist; this server serves {served!r}", "model", "model_not_found"
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, gen=Depends(ready)):
    return ModelList(data=[model_card(server_state(request), gen)])


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, gen=Depends(ready)):
    state = server_state(request)
    if model_id != state.scfg.model_name:
        raise _unknown_model(model_id, state.scfg.model_name)
    return model_card(state, gen)


@router.post("/v1/completions", responses={200: {"model": CompletionResponse}})
async def completions(req: CompletionRequest, request: Request, gen=Depends(ready)):
    """Continue `prompt` (one prompt; `n` choices)."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            msg = f"prompt: one prompt per request (got {len(prompt)}); use n for several choices"
            raise ApiError(400, msg, "prompt")
        prompt = prompt[0]
    try:
        check_prompt(prompt)
    except NextSpeedError as e:
        raise ApiError(400, str(e), "prompt") from e
    return await _complete("text", req, prompt, request, gen)


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}})
async def chat_completions(req: ChatRequest, request: Request, gen=Depends(ready)):
    """Continue the conversation: its messages' contents in order, as one text."""
    prompt = oa.chat_prompt(req.messages)
    try:
        check_prompt(prompt, "messages")
    except NextSpeedError as e:
        raise ApiError(400, str(e), "messages") from e
    return await _complete("chat", req, prompt, request, gen)


def _check_request(kind: str, req, prompt: str, scfg) -> None:
    if req.model != scfg.model_name:
        raise _unknown_model(req.model, scfg.model_name)
    field = "messages" if kind == "chat" else "prompt"
    check_length(prompt, field, scfg.max_prompt_chars, code="context_length_exceeded")
    if req.n > scfg.max_choices:
        raise ApiError(400, f"n: {req.n} is over the limit of {scfg.max_choices} (MAX_CHOICES)", "n")
    if req.n_cand is not None and req.n_cand > scfg.max_n_cand:
        raise ApiError(400, f"n_cand: {req.n_cand} is over the limit of {scfg.max_n_cand} (MAX_N_CAND)", "n_cand")


def _submit_all(state: ServerState, kws: list[dict], prompt: str, on_step=None) -> list:
    """Queue the request's choices (all or none: a full queue refuses the whole request)."""
    futs = []
    try:
        for i, kw in enumerate(kws):
            kw = dict(kw)
            fut = state.sched.submit(
                prompt,
                kw.pop("max_sentences"),
                plan=kw.pop("plan"),
                max_tokens=kw.pop("max_tokens"),
                stop=kw.pop("stop"),
                on_step=on_step(i) if on_step else None,
                **kw,
            )
            futs.append(fut)
    except NextSpeedError as e:  # busy (503 with Retry-After) or a bad setting (400)
        for f in futs:
            f.cancel()
        raise api_error(e, state.scfg.retry_after) from e
    return futs


async def _complete(kind: str, req, prompt: str, request: Request, gen):
    state = server_state(request)
    scfg = state.scfg
    _check_request(kind, req, prompt, scfg)
    kws, _ = oa.generation_kwargs(req, gen.params.seed, scfg.max_sentences_cap)
    rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
    prompt_tokens = len(gen.tok(prompt, add_special_tokens=False)["input_ids"])
    if req.stream:
        return _stream(kind, req, prompt, rid, prompt_tokens, state, kws)
    futs = _submit_all(state, kws, prompt)
    try:
        results = await await_or_disconnect(request, futs)
    except NextSpeedError as e:
        raise api_error(e, scfg.retry_after) from e
    if results is None:
        return JSONResponse(status_code=499, content=envelope(499, "the client closed the connection"))
    for r in results:
        state.metrics.record(r)
    return oa.completion_object(kind, rid, scfg.model_name, results, prompt_tokens, req.return_candidates)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(kind: str, req, prompt: str, rid: str, prompt_tokens: int, state: ServerState, kws: list[dict]):
    """Server-sent events: a chunk per sentence as it is written (in order per choice), a final
    chunk per choice with finish_reason (and usage on the last), then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item):
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    futs = _submit_all(state, kws, prompt, on_step=lambda i: lambda st: put((i, st)))
    for i, f in enumerate(futs):
        f.add_done_callback(lambda f, i=i: put((i, None)))
    events = _events(kind, req, rid, prompt_tokens, state, futs, queue)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _events(kind: str, req, rid: str, prompt_tokens: int, state: ServerState, futs: list, queue):
    model, created = state.scfg.model_name, int(time.time())
    pending, written, tokens = set(range(len(futs))), [0] * len(futs), 0
    try:
        if kind == "chat":
            for i in range(len(futs)):
                yield _sse(oa.chunk(kind, rid, model, created, i, "", role=True))
        while pending:
            i, st = await queue.get()
            if st is not None:  # a sentence step of choice i
                if st.chosen is not None and st.sentence:
                    sep = "" if kind == "chat" and not written[i] else " "
                    written[i] += 1
                    extra = {"sentence": oa.sentence_info(st, req.return_candidates)}
                    yield _sse(oa.chunk(kind, rid, model, created, i, sep + st.sentence, extra=extra))
                continue
            pending.discard(i)  # choice i is done
            f = futs[i]
            if f.cancelled():
                continue
            if f.exception() is not None:
                yield _sse(_stream_error(f.exception(), state))
                continue
            res = f.result()
            state.metrics.record(res)
            tokens += oa.completion_tokens(res)
            extra = {"stop_reason": res.stop_reason, "timings": res.timings}
            body = oa.chunk(kind, rid, model, created, i, None, oa.FINISH.get(res.stop_reason, "stop"), extra)
            if not pending:
                body["usage"] = oa.usage(prompt_tokens, tokens)
            yield _sse(body)
        yield "data: [DONE]\n\n"
    finally:
        for f in futs:
            f.cancel()  # the client went away: its generations leave the batch


def _stream_error(exc: BaseException, state: ServerState) -> dict:
    """A choice that failed mid-stream: its error in OpenAI's envelope, counted in the metrics."""
    if isinstance(exc, NextSpeedError):
        err = api_error(exc, state.scfg.retry_after)
    else:
        log.error("a streamed generation failed", exc_info=exc)
        err = ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details")
    state.metrics.errors.labels("stream", str(err.status)).inc()
    return err.body()
