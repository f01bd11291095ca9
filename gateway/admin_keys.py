"""The admin API for keys and usage (admin keys only, like the rest of /admin).

    GET    /admin/keys               every store key, and the config file's (read-only)
    POST   /admin/keys               {"name": ..., fields}: 201 with the secret, shown this once
    GET    /admin/keys/{name}        one key
    PATCH  /admin/keys/{name}        {fields}: change them
    DELETE /admin/keys/{name}        revoke it
    GET    /admin/usage?key=&model=&since=&until=&by=hour|day

A change is in the store when the answer comes, and in force on every gateway sharing the store
within a second (tenancy.py polls).
"""

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway import manage
from gateway.admin import AdminAuth
from gateway.errors import BadRequest, GatewayError, NoReadyReplica, NotFound
from gateway.keys import KeyFieldError
from gateway.request import parse, read_body
from gateway.state import Gateway
from gateway.store import KeyExists, StoreDown

T = TypeVar("T")
MAX_BODY = 64 * 1024


class StoreUnavailable(NoReadyReplica):
    code = "store_unavailable"


class Conflict(BadRequest):
    status = 409
    code = "key_exists"


def keys_router(gateway: Gateway, auth: AdminAuth) -> APIRouter:
    router = APIRouter(prefix="/admin")
    tenancy = gateway.keys
    store, config = tenancy.store, gateway.config

    async def refresh() -> None:
        """In force here at once; the other gateways on the store follow at their next poll."""
        try:
            await tenancy.poll()
        except StoreDown:
            pass  # written, and the poll loop will load it once it can

    @router.get("/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        stored = await _call(store.keys)
        keys = [k.public() for k in tenancy.config_keys] + [k.public() for k in stored]
        return {"object": "list", "data": keys}

    @router.post("/keys")
    async def create(request: Request) -> JSONResponse:
        auth.authenticate(request)
        fields = await _fields(request)
        name = fields.pop("name", None)
        record, secret = await _call(manage.create, store, config, name, fields)
        await refresh()
        return JSONResponse({**record.public(), "key": secret}, 201)

    @router.get("/keys/{name}")
    async def show(request: Request, name: str) -> dict[str, Any]:
        auth.authenticate(request)
        return (await _call(manage.show, store, name)).public()

    @router.patch("/keys/{name}")
    async def update(request: Request, name: str) -> dict[str, Any]:
        auth.authenticate(request)
        fields = await _fields(request)
        record = await _call(manage.update, store, config, name, fields)
        await refresh()
        return record.public()

    @router.delete("/keys/{name}")
    async def revoke(request: Request, name: str) -> dict[str, Any]:
        auth.authenticate(request)
        record = await _call(manage.revoke, store, name)
        await refresh()
        return record.public()

    @router.get("/usage")
    async def usage(
        request: Request,
        key: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        by: str = "day",
    ) -> dict[str, Any]:
        auth.authenticate(request)
        if by not in ("hour", "day"):
            raise BadRequest(f"by: expected hour or day, got {by!r}", "by")
        rows = await _call(store.usage, key, model, since, until, by)
        return {"object": "list", "data": rows}

    return router


async def _fields(request: Request) -> dict[str, Any]:
    body = parse(await read_body(request, MAX_BODY))
    if "key" in body or "secret" in body:
        raise BadRequest("a key's secret is made by the gateway; do not send one", "key")
    return dict(body)


async def _call(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking store call in a thread; its errors as the API's."""
    try:
        return await asyncio.to_thread(function, *args)
    except KeyFieldError as exc:
        raise BadRequest(str(exc), str(exc).split(":", 1)[0]) from None
    except KeyExists as exc:
        raise Conflict(str(exc), "name") from None
    except manage.NoSuchKey as exc:
        raise NotFound(str(exc)) from None
    except StoreDown as exc:
        raise StoreUnavailable(f"the key store is down: {exc}") from None
    except GatewayError:
        raise
