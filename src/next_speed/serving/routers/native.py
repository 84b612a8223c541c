"""The spec's own API: `POST /generate` and `GET /health`."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from next_speed.core.errors import NextSpeedError
from next_speed.generation.generate import check_prompt
from next_speed.serving.errors import ApiError, api_error, check_length
from next_speed.serving.middleware import await_or_disconnect
from next_speed.serving.protocol import ErrorResponse, GenerateResponse, HealthResponse, generate_request_model
from next_speed.serving.state import ready, server_state


async def health(request: Request):
    """200 once the models are loaded, 503 while they load or when they failed to."""
    # async: answered on the event loop, never queued behind generations
    state = server_state(request)
    if state.gen is not None:
        g = state.gen
        return {"status": "ok", "device": getattr(g, "device", None), "dtype": getattr(g, "dtype", None)}
    msg = f"models failed to load: {state.error}" if state.error else "loading models"
    return JSONResponse(status_code=503, content={"error": msg})


def router(scfg) -> APIRouter:
    """The native routes; POST /generate's body model carries this server's caps."""
    r = APIRouter(tags=["native"])
    GenerateRequest = generate_request_model(scfg.max_n_cand, scfg.max_new_tokens_cap, scfg.max_sentences_cap)
    r.add_api_route(
        "/health", health, methods=["GET"], responses={200: {"model": HealthResponse}, 503: {"model": ErrorResponse}}
    )

    async def generate(req: GenerateRequest, request: Request, gen=Depends(ready)):  # type: ignore[valid-type]
        """Continue `prompt` by `max_sentences` sentences; `params` override the generation knobs."""
        check_length(req.prompt, "prompt", scfg.max_prompt_chars, status=413)
        try:
            check_prompt(req.prompt)
            fut = server_state(request).sched.submit(
                req.prompt, req.max_sentences, plan=req.plan, **req.params.model_dump(exclude_none=True)
            )
            got = await await_or_disconnect(request, [fut])
        except NextSpeedError as e:
            raise api_error(e, scfg.retry_after, status=422) from e
        if got is None:
            raise ApiError(499, "the client closed the connection")
        res = got[0]
        request.app.state.metrics.record(res)
        return GenerateResponse(
            text=res.text,
            sentences=res.sentences,
            planned=res.planned,
            realized=res.realized,
            stop_reason=res.stop_reason,
            timings=res.timings,
        )

    r.add_api_route(
        "/generate",
        generate,
        methods=["POST"],
        response_model=GenerateResponse,
        responses={422: {"model": ErrorResponse}},
    )
    return r
