"""The code browser: what a code means (`GET /v1/codes/{level}/{index}`) and a sentence's codes
(`POST /v1/codes/encode`)."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from next_speed.core.errors import NextSpeedError
from next_speed.generation.generate import check_prompt
from next_speed.serving.errors import ApiError, check_length
from next_speed.serving.protocol import EncodeRequest, EncodeResponse
from next_speed.serving.state import ready, server_state

router = APIRouter(tags=["codes"])


@router.get("/v1/codes/{level}/{index}")
async def code_info(
    level: int, index: int, n: int = Query(8, ge=1, le=100), neighbours: int = Query(5, ge=0, le=50), gen=Depends(ready)
) -> dict:
    """The code's carriers (training sentences nearest to the codeword) and its nearest codewords."""
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


@router.post("/v1/codes/encode", response_model=EncodeResponse)
async def encode_text(req: EncodeRequest, request: Request, gen=Depends(ready)):
    """Embed and quantize one sentence."""
    try:
        check_prompt(req.text, "text")
    except NextSpeedError as e:
        raise ApiError(400, str(e), "text") from e
    check_length(req.text, "text", server_state(request).scfg.max_prompt_chars)

    def run():
        with gen._lock:
            return gen.codes_of(req.text)

    return {"text": req.text, "codes": await run_in_threadpool(run)}
