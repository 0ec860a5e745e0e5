"""The web playground (/playground) and console (/console): static files shipped in the package
(lmserve/server/static), served as they are. No build step and nothing fetched from elsewhere at
run time: the pages are plain HTML, CSS and JavaScript modules that talk to the public API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PREFIX = "/ui"
PAGES = {"/playground": "playground.html", "/console": "console.html"}

# Everything from this origin only: no inline script, no CDN, no framing. The pages keep the key
# in sessionStorage, so a script injected from elsewhere must have no way in.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_PAGE_HEADERS = {"content-security-policy": _CSP, "x-content-type-options": "nosniff",
                 "referrer-policy": "no-referrer", "cache-control": "no-cache"}


class _Assets(StaticFiles):
    """The pages' scripts and styles, revalidated on each load (an upgrade shows at once), with
    the same no-sniff header as the pages."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = "no-cache"
        response.headers["x-content-type-options"] = "nosniff"
        return response


def ui_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def page(filename: str):
        async def serve():
            return FileResponse(STATIC_DIR / filename, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

        return serve

    for path, filename in PAGES.items():
        router.add_api_route(path, page(filename), methods=["GET", "HEAD"])

    @router.get("/")
    async def root():
        return RedirectResponse("/playground", status_code=307)

    return router


def mount_ui(app) -> None:
    if not (STATIC_DIR / "playground.html").is_file():  # a broken install: say so at start, not per request
        raise RuntimeError(f"the web UI's files are missing from {STATIC_DIR}; reinstall lmserve")
    app.include_router(ui_router())
    app.mount(ASSETS_PREFIX, _Assets(directory=STATIC_DIR), name="ui-assets")
