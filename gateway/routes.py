"""HTTP routes besides the proxied ones (hotpath.py). Each handler is a few lines."""

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.state import Gateway

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """Every configured model and alias; `ready` says whether a replica can take requests now.

    An alias is listed as a model of its own, with `alias_of` naming the model it points at.
    """
    gateway = _gateway(request)
    key = gateway.keys.authenticate(request)
    data = []
    for model in gateway.config.models:
        workers = gateway.supervisor.by_model(model.name)
        ready = sum(w.is_ready for w in workers)
        card = {
            "id": model.name,
            "object": "model",
            "created": gateway.created,
            "owned_by": "enginegate",
            "backend": model.backend,
            "ready": ready > 0,
            "replicas_ready": ready,
            "replicas": len(workers),
        }
        if key.allows(model.name):
            data.append(card)
        data += [
            {**card, "id": alias, "alias_of": model.name}
            for alias in model.aliases
            if key.allows(alias) or key.allows(model.name)
        ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 when every model has a ready replica, else 503; the body says which are not.
    A model that starts on demand counts as ready: its engine starts with a request."""
    gateway = _gateway(request)
    models = {
        m.name: sum(w.is_ready for w in gateway.supervisor.by_model(m.name))
        for m in gateway.config.models
        if m.start != "on_demand"
    }
    is_ready = all(models.values()) and not gateway.proxy.is_draining
    body = {
        "status": "ready" if is_ready else "not ready",
        "replicas_ready": models,
        # A store that is down is said, not failed on: cached keys keep serving meanwhile.
        "store": gateway.keys.store_state,
        "uptime_seconds": round(time.monotonic() - gateway.started, 1),
    }
    return JSONResponse(body, 200 if is_ready else 503)
