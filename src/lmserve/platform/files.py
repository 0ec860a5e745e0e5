"""Uploaded files (`/v1/files`): metadata in the platform database, contents in a directory.

The directory (`platform.files_dir`, default `<data_dir>/files`) may be a volume several API
servers share, like the database. A file is owned by its key's account: every lookup is by
(id, account), so another account's file does not exist for it (404, never 403, which would tell
that the id is taken). Contents are written to a temporary name, fsynced and renamed before the
row is committed: a row never points at a half-written file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from lmserve.platform.db import Base, Database, now

PURPOSES = ("batch", "batch_output")  # what a client uploads; what the batch worker writes


class StoredFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(300))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def view(f: StoredFile) -> dict:
    """The OpenAI file object."""
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None}


class FileStore:
    def __init__(self, db: Database, directory: str | Path):
        self.db = db
        self.dir = Path(directory).expanduser()

    def path(self, file_id: str) -> Path:
        # ids are ours ("file-" + hex), never a client's text: no path tricks possible
        return self.dir / file_id

    def write(self, file_id: str, chunks) -> int:
        """Write the contents (an iterable of bytes) durably under `file_id`; returns the size."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path(file_id)
        tmp = final.with_name(f".{file_id}.part")
        size = 0
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
        return size

    def add(self, file_id: str, account_id: int, purpose: str, filename: str, size: int, lines: int) -> StoredFile:
        row = StoredFile(id=file_id, account_id=account_id, purpose=purpose, filename=filename[:300], bytes=size,
                         lines=lines, created_at=now())
        with self.db.session() as s:
            s.merge(row)  # a batch's output file written again after a restart mid-finalizing
        return row

    def get(self, file_id: str, account_id: int) -> StoredFile | None:
        with self.db.session() as s:
            return s.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.account_id == account_id))

    def list(self, account_id: int, purpose: str | None = None, after: str | None = None,
             limit: int = 10000, order: str = "desc") -> list[StoredFile]:
        with self.db.session() as s:
            q = select(StoredFile).where(StoredFile.account_id == account_id)
            if purpose:
                q = q.where(StoredFile.purpose == purpose)
            key = (StoredFile.created_at, StoredFile.id)
            if after:
                pivot = s.scalar(select(StoredFile).where(StoredFile.id == after,
                                                          StoredFile.account_id == account_id))
                if pivot is not None:
                    if order == "desc":
                        q = q.where((StoredFile.created_at < pivot.created_at) |
                                    ((StoredFile.created_at == pivot.created_at) & (StoredFile.id < pivot.id)))
                    else:
                        q = q.where((StoredFile.created_at > pivot.created_at) |
                                    ((StoredFile.created_at == pivot.created_at) & (StoredFile.id > pivot.id)))
            q = q.order_by(*(k.desc() for k in key) if order == "desc" else key).limit(limit)
            return list(s.scalars(q))

    def delete(self, file_id: str, account_id: int) -> bool:
        with self.db.session() as s:
            row = s.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.account_id == account_id))
            if row is None:
                return False
            s.delete(row)
        self.path(file_id).unlink(missing_ok=True)
        return True

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()
