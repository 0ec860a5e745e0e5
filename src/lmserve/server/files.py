"""/v1/files: upload (multipart), list, retrieve, download and delete a file of the caller's account.

Uploads are parsed by python-multipart (Starlette's form parser), which spools a large part to a
temporary file rather than memory; the declared size is checked before parsing and the real one
after. Copying the upload into the file store and counting its lines run on a worker thread.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from lmserve.config import PlatformSettings
from lmserve.platform import files as store
from lmserve.platform.service import Platform
from lmserve.server.errors import APIError, bad_request

_COPY_CHUNK = 1 << 20


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", "id", "file_not_found")


def files_router(platform: Platform, settings: PlatformSettings, files: store.FileStore) -> APIRouter:
    router = APIRouter()
    cap = int(settings.max_file_bytes)

    @router.post("/v1/files")
    async def upload(request: Request):
        """Upload a JSONL file of requests (`purpose=batch`), as multipart form data."""
        principal = await platform.authenticate(request.headers.get("authorization"))
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap + 64 * 1024:  # the form's framing beside it
            raise APIError(413, f"the file is larger than {cap} bytes", "file", "file_too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("upload the file as multipart/form-data with fields `file` and `purpose`", "file")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # a malformed multipart body, or too many parts
            raise bad_request(f"the multipart body could not be read: {e}", "file") from None
        try:
            purpose, upload_file = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise bad_request("purpose must be \"batch\" (the files this server takes are batch inputs)",
                                  "purpose")
            if not isinstance(upload_file, UploadFile):
                raise bad_request("a `file` part is required", "file")
            file_id = store.new_file_id()
            size, lines = await asyncio.to_thread(_copy, files, file_id, upload_file, cap, settings.max_batch_lines)
            row = await platform.run(files.add, file_id, principal.account_id, purpose,
                                     upload_file.filename or "upload.jsonl", size, lines)
            return store.view(row)
        finally:
            await form.close()

    @router.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                         limit: int = 10000, order: str = "desc"):
        principal = await platform.authenticate(request.headers.get("authorization"))
        if not 1 <= limit <= 10000:
            raise bad_request("limit must be from 1 to 10000", "limit")
        if order not in ("asc", "desc"):
            raise bad_request("order must be asc or desc", "order")
        rows = await platform.run(files.list, principal.account_id, purpose, after, limit + 1, order)
        data = [store.view(f) for f in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    @router.get("/v1/files/{file_id}")
    async def retrieve(request: Request, file_id: str):
        principal = await platform.authenticate(request.headers.get("authorization"))
        row = await platform.run(files.get, file_id, principal.account_id)
        if row is None:
            raise not_found(file_id)
        return store.view(row)

    @router.get("/v1/files/{file_id}/content")
    async def content(request: Request, file_id: str):
        principal = await platform.authenticate(request.headers.get("authorization"))
        row = await platform.run(files.get, file_id, principal.account_id)
        if row is None or not files.path(file_id).exists():
            raise not_found(file_id)
        return FileResponse(files.path(file_id), media_type="application/jsonl", filename=row.filename)

    @router.delete("/v1/files/{file_id}")
    async def delete(request: Request, file_id: str):
        principal = await platform.authenticate(request.headers.get("authorization"))
        if not await platform.run(files.delete, file_id, principal.account_id):
            raise not_found(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    return router


def _copy(files: store.FileStore, file_id: str, upload: UploadFile, cap: int, max_lines: int) -> tuple[int, int]:
    """The upload into the store (blocking): its size and line count, within the limits."""
    counted = {"bytes": 0, "lines": 0, "last": b"\n"}

    def chunks():
        upload.file.seek(0)
        while piece := upload.file.read(_COPY_CHUNK):
            counted["bytes"] += len(piece)
            if counted["bytes"] > cap:
                raise APIError(413, f"the file is larger than {cap} bytes", "file", "file_too_large")
            counted["lines"] += piece.count(b"\n")
            counted["last"] = piece[-1:]
            if counted["lines"] > max_lines:
                raise bad_request(f"the file has more than {max_lines} lines (requests)", "file", "too_many_lines")
            yield piece

    try:
        size = files.write(file_id, chunks())
    except BaseException:
        files.path(file_id).with_name(f".{file_id}.part").unlink(missing_ok=True)
        raise
    lines = counted["lines"] + (0 if counted["last"] == b"\n" or size == 0 else 1)
    if lines > max_lines:
        files.path(file_id).unlink(missing_ok=True)
        raise bad_request(f"the file has more than {max_lines} lines (requests)", "file", "too_many_lines")
    return size, lines
