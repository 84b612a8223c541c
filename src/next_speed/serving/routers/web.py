"""GET /: the web page (a single HTML file that talks to the OpenAI-compatible API)."""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["web"])


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(files("next_speed.serving").joinpath("web/index.html").read_text(encoding="utf-8"))
