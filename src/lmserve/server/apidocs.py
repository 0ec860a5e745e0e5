"""The API docs: Swagger UI at /docs and ReDoc at /redoc, both reading /openapi.json, served
entirely from this server. The Swagger UI and ReDoc bundles come from the `fastapi-offline`
package (which ships their dist files); the two pages and Swagger UI's start-up script are ours
(lmserve/server/static), written without inline script so the pages keep a CSP that allows this
origin's files only (server/security.py). Nothing is fetched from a CDN: the docs work offline and
no third-party script runs on the origin where the playground keeps its key."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from lmserve.server.ui import RevalidatedFiles, page_router

ASSETS_PREFIX = "/docs/assets"
PAGES = {"/docs": "docs.html", "/redoc": "redoc.html"}
BUNDLES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")


def bundle_dir() -> Path:
    try:
        return Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        raise RuntimeError("the API docs need the fastapi-offline package; reinstall lmserve") from None


def mount_api_docs(app) -> None:
    directory = bundle_dir()
    missing = [name for name in BUNDLES if not (directory / name).is_file()]
    if missing:  # a broken install: say so at start, not as a blank page
        raise RuntimeError(f"the API docs' files {missing} are missing from {directory}; reinstall lmserve")
    app.include_router(page_router(PAGES))
    app.mount(ASSETS_PREFIX, RevalidatedFiles(directory=directory), name="docs-assets")
