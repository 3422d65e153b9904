"""The web page: GET / and its assets under /static, plain files that need no network."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
STATIC_PATH = "/static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The single-page UI: sample, interpolate, draw and analyse, watch latency."""
    # Revalidated on each load, so a redeployed page is never stale.
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's CSS and JS, to mount at STATIC_PATH."""
    return StaticFiles(directory=STATIC_DIR)
