"""The admin API (/admin/..., admin keys only): keys, accounts, top-ups and usage, the same
operations as `lmserve keys|accounts|usage` on the command line."""

from __future__ import annotations

import math
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmserve.errors import Refused
from lmserve.platform import keys, usage
from lmserve.platform.db import to_nanos
from lmserve.platform.service import Platform
from lmserve.server.errors import APIError, bad_request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateKey(_Body):
    account: str = Field(min_length=1, max_length=200)
    tier: str | None = Field(default=None, min_length=1, max_length=50)
    name: str = Field(default="", max_length=200)
    rpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    tpd: int | None = Field(default=None, ge=1)
    models: list[str] | None = None
    balance: str | None = None  # granted credit added to the account, a decimal string
    expires: str | None = None  # "30d" or an ISO date
    admin: bool = False


class UpdateAccount(_Body):
    tier: str | None = Field(default=None, min_length=1, max_length=50)
    status: Literal["active", "disabled"] | None = None
    rpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    tpd: int | None = Field(default=None, ge=1)
    clear_limits: bool = False


class TopUp(_Body):
    amount: str
    granted: bool = False  # add to the granted balance instead of the paid one


def _parse(model: type[BaseModel], payload) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or None
        raise bad_request(f"invalid value for {where!r}: {err['msg']}", where) from None


def _not_found(e: keys.NotFound) -> APIError:
    return APIError(404, str(e), code="not_found")


def admin_router(platform: Platform) -> APIRouter:
    router = APIRouter(prefix="/admin")
    db = platform.db

    async def admin(request: Request) -> None:
        try:
            await platform.authenticate_admin(request.headers.get("authorization"))
        except Refused as e:  # 401, 403, or 503 when the platform's database is away
            headers = {"Retry-After": str(math.ceil(e.retry_after))} if e.retry_after is not None else None
            raise APIError(e.status, e.message, code=e.code, headers=headers) from None

    async def body(request: Request):
        try:
            return await request.json()
        except ValueError:
            raise bad_request("the request body is not valid JSON", None, "invalid_json") from None

    @router.post("/keys")
    async def create_key(request: Request):
        await admin(request)
        req = _parse(CreateKey, await body(request))
        try:
            expires_at = keys.parse_time(req.expires, future=True) if req.expires else None
            if req.balance is not None and to_nanos(req.balance) < 0:
                raise ValueError("balance must not be negative")
        except ValueError as e:
            raise bad_request(str(e), "expires" if "duration" in str(e) else "balance") from None
        limits = {n: getattr(req, n) for n in ("rpm", "rpd", "tpm", "tpd")}
        key, row = await platform.run(keys.create_key, db, req.account, tier=req.tier, limits=limits,
                                           models=req.models, balance=req.balance, expires_at=expires_at,
                                           name=req.name, is_admin=req.admin)
        listed = await platform.run(keys.list_keys, db, req.account)
        return {"key": key, **next(k for k in listed if k["id"] == row.id)}

    @router.get("/keys")
    async def list_keys(request: Request, account: str | None = None, include_revoked: bool = False):
        await admin(request)
        return {"data": await platform.run(keys.list_keys, db, account, include_revoked)}

    @router.post("/keys/{key}/revoke")
    async def revoke_key(request: Request, key: str):
        await admin(request)
        try:
            return await platform.run(keys.revoke_key, db, key)
        except keys.NotFound as e:
            raise _not_found(e) from None

    @router.get("/accounts")
    async def list_accounts(request: Request):
        await admin(request)
        return {"data": await platform.run(keys.list_accounts, db)}

    @router.post("/accounts/{name}/topup")
    async def topup(request: Request, name: str):
        await admin(request)
        req = _parse(TopUp, await body(request))
        try:
            if to_nanos(req.amount) <= 0:
                raise ValueError
        except ValueError:
            raise bad_request("amount must be a positive decimal number, e.g. \"10.50\"", "amount") from None
        try:
            return await platform.run(keys.topup, db, name, req.amount, req.granted)
        except keys.NotFound as e:
            raise _not_found(e) from None

    @router.patch("/accounts/{name}")
    async def update_account(request: Request, name: str):
        await admin(request)
        req = _parse(UpdateAccount, await body(request))
        limits = {n: getattr(req, n) for n in ("rpm", "rpd", "tpm", "tpd")}
        try:
            return await platform.run(keys.update_account, db, name, tier=req.tier, status=req.status,
                                           limits=limits, clear_limits=req.clear_limits)
        except keys.NotFound as e:
            raise _not_found(e) from None

    @router.get("/usage")
    async def usage_summary(request: Request, account: str | None = None, model: str | None = None,
                            since: str | None = None):
        await admin(request)
        try:
            since_ts = keys.parse_time(since, future=False) if since else None
        except ValueError as e:
            raise bad_request(str(e), "since") from None
        return {"data": await platform.run(usage.summary, db, account, model, since_ts)}

    return router
