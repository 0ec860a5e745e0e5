"""The API docs: Swagger UI at /docs and ReDoc at /redoc, both reading /openapi.json, served
entirely from this server. The Swagger UI and ReDoc bundles come from the `fastapi-offline`
package (which ships their dist files); the two pages and Swagger UI's start-up script are ours
(lmserve/server/static), written without inline script so the pages keep a CSP that allows this
origin's files only (server/security.py). Nothing is fetched from a CDN: the docs work offline and
no third-party script runs on the origin where the playground keeps its key.

Also the OpenAPI document's patch: the request bodies the routes validate themselves (they read
raw JSON to answer every mistake in the API's own error shape) are published in it, so /docs
shows the real schema.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI

from lmserve.chat.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
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


_DOCUMENTED_BODIES = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)


def body_schema(name: str) -> dict:
    """A route's `openapi_extra`: its request body is the named model of _DOCUMENTED_BODIES."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def openapi_schema(app: FastAPI) -> dict:
    """`app.openapi`: FastAPI's document plus the documented bodies and the bearer scheme."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in _DOCUMENTED_BODIES],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs.get("$defs", {}))
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema
