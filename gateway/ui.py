"""The status page at /ui: one HTML file with a little JavaScript, no build step.

The page itself holds no data, so it is served to anyone; its script asks for the admin key,
keeps it in the tab's sessionStorage and reads /admin/status with it every 2 s.
"""

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

# The page builds its DOM from text (never innerHTML) and needs nothing from elsewhere.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def page() -> str:
    return files("gateway").joinpath("templates/status.html").read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse)
async def status_page() -> HTMLResponse:
    return HTMLResponse(page(), headers=HEADERS)
