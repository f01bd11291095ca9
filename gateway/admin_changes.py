"""Admin routes that change the running fleet (gateway/rollout.py), with the admin keys:

    POST /admin/reload?dry_run=&wait=         re-read the config file and apply the difference
    GET  /admin/reload                        the latest change: plan, state, errors, seconds
    POST /admin/models/{name}/restart?wait=   replace every worker of a model, replica by replica
    POST /admin/workers/{id}/replace?wait=    replace one worker with a fresh one, the same way

A change is answered 202 while it runs (200 with `wait=true`, once it is done), 400 when the
file cannot be applied (nothing changed; the message says why, as `enginegate check` does) and
409 while another change runs.
"""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.admin import AdminAuth
from gateway.config import ConfigError
from gateway.errors import BadRequest
from gateway.rollout import Rollout


class ConfigRefused(BadRequest):
    code = "invalid_config"


def changes_router(rollout: Rollout, auth: AdminAuth) -> APIRouter:
    router = APIRouter(prefix="/admin")

    async def answer(wait: bool, **fields: Any) -> JSONResponse:
        if wait:
            await rollout.wait()
        body = {**fields, **(rollout.last or {})}
        return JSONResponse(body, 200 if wait else 202)

    @router.post("/reload")
    async def reload(request: Request, dry_run: bool = False, wait: bool = False) -> JSONResponse:
        auth.authenticate(request)
        try:
            plan = rollout.plan()[1] if dry_run else rollout.reload()
        except ConfigError as exc:
            raise ConfigRefused(f"nothing changed: {exc}") from None
        if dry_run:
            return JSONResponse({"plan": plan.as_dict(), "text": plan.describe(), "dry_run": True})
        return await answer(wait, text=plan.describe())

    @router.get("/reload")
    async def last(request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        return rollout.last or {"kind": None, "state": "none"}

    @router.post("/models/{name:path}/restart")
    async def restart_model(request: Request, name: str, wait: bool = False) -> JSONResponse:
        auth.authenticate(request)
        rollout.restart(model=name)
        return await answer(wait)

    @router.post("/workers/{worker_id:path}/replace")
    async def replace_worker(request: Request, worker_id: str, wait: bool = False) -> JSONResponse:
        auth.authenticate(request)
        rollout.restart(worker_id=worker_id)
        return await answer(wait)

    return router
