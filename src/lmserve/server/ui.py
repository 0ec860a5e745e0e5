"""The web playground (/playground) and console (/console): static files shipped in the package
(lmserve/server/static), served as they are. No build step and nothing fetched from elsewhere at
run time: the pages are plain HTML, CSS and JavaScript modules that talk to the public API. Their
security headers (CSP, no framing, no referrer) are set for every HTML response in
server/security.py."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PREFIX = "/ui"
PAGES = {"/playground": "playground.html", "/console": "console.html"}


class RevalidatedFiles(StaticFiles):
    """Scripts and styles, revalidated on each load (an upgrade shows at once). The HTML files in
    the folder are not served from here: each page has one URL (/playground, /console, /docs,
    /redoc), so every way to a page carries the page's headers (server/security.py)."""

    def lookup_path(self, path: str):
        full_path, stat_result = super().lookup_path(path)
        if full_path.lower().endswith((".html", ".htm")):
            return "", None  # a 404, as for a file that is not there
        return full_path, stat_result

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = "no-cache"
        return response


def page_router(pages: dict[str, str]) -> APIRouter:
    """GET/HEAD routes serving each static HTML file at its path, revalidated on each load."""
    router = APIRouter(include_in_schema=False)

    def page(filename: str):
        async def serve():
            return FileResponse(STATIC_DIR / filename, media_type="text/html; charset=utf-8",
                                headers={"cache-control": "no-cache"})

        return serve

    for path, filename in pages.items():
        router.add_api_route(path, page(filename), methods=["GET", "HEAD"])
    return router


def ui_router() -> APIRouter:
    router = page_router(PAGES)

    @router.get("/")
    async def root():
        return RedirectResponse("/playground", status_code=307)

    return router


def mount_ui(app) -> None:
    if not (STATIC_DIR / "playground.html").is_file():  # a broken install: say so at start, not per request
        raise RuntimeError(f"the web UI's files are missing from {STATIC_DIR}; reinstall lmserve")
    app.include_router(ui_router())
    app.mount(ASSETS_PREFIX, RevalidatedFiles(directory=STATIC_DIR), name="ui-assets")
