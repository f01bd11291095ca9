"""The admin API under /admin, for operators, with keys of its own (`gateway.admin_keys`).

    GET  /admin/status                    models, workers, GPUs and counter totals (the UI's poll)
    GET  /admin/workers                   every worker: state, devices, port or socket, pid, ...
    POST /admin/workers/{id}/restart      end the worker's engine and start it again
    GET  /admin/workers/{id}/log?lines=N  the last N lines of its log, as text (`&rank=R`: rank
                                          R's of a worker over several nodes)

An ordinary API key is refused with 403: it is valid, but not for this. With no admin keys
configured the admin API is off (403), unless the whole gateway runs open
(`allow_unauthenticated` with no `api_keys`), in which case so does the admin API.
"""

import time
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from backends.adapters import ADAPTERS
from backends.supervisor import Supervisor, Worker, WorkerView
from gateway import __version__
from gateway.auth import KeyRing, bearer_token
from gateway.errors import Forbidden, NotFound, Unauthorized
from gateway.gpu_metrics import GpuCollector
from gateway.metrics import Metrics
from gateway.state import Gateway
from gateway.tenancy import Tenancy

MAX_LOG_LINES = 5000


class AdminAuth:
    def __init__(self, admin_keys: list[str], api_keys: Tenancy) -> None:
        self.update(admin_keys, api_keys)

    def update(self, admin_keys: list[str], api_keys: Tenancy) -> None:
        """New keys, e.g. after a reload."""
        self.admin_keys = KeyRing(admin_keys)
        self.api_keys = api_keys

    @property
    def is_open(self) -> bool:
        # Asked each time: an open gateway closes once its store holds a key.
        return self.admin_keys.is_open and self.api_keys.is_open

    def authenticate(self, request: Request) -> str:
        """The admin key's name; raises Unauthorized (no or unknown key) or Forbidden."""
        if self.is_open:
            return "anonymous"
        if self.admin_keys.is_open:
            raise Forbidden("the admin API is off: add a key to gateway.admin_keys")
        token = bearer_token(request)
        if token is None:
            raise Unauthorized("missing admin key: send `Authorization: Bearer <admin key>`")
        name = self.admin_keys.principal(token)
        if name is not None:
            return name
        if self.api_keys.principal(token) is not None:
            raise Forbidden("an API key cannot use the admin API; use one of gateway.admin_keys")
        raise Unauthorized("invalid admin key")


def admin_router(gateway: Gateway, auth: AdminAuth, gpus: GpuCollector) -> APIRouter:
    router = APIRouter(prefix="/admin")
    supervisor = gateway.supervisor

    def worker_or_404(worker_id: str) -> Worker:
        worker = supervisor.get(worker_id)
        if worker is None:
            raise NotFound(f"no worker `{worker_id}`; see GET /admin/workers")
        return worker

    @router.get("/status")
    async def status(request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        return {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - gateway.started, 1),
            "time": time.time(),
            "models": models(gateway),
            "workers": [describe(w.view()) for w in supervisor.workers],
            "gpus": [vars(gpu) for gpu in gpus.read()],
            "totals": totals(gateway.metrics),
            "tenancy": gateway.keys.status(),
        }

    @router.get("/workers")
    async def workers(request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        return {"object": "list", "data": [describe(w.view()) for w in supervisor.workers]}

    # `:path`: an id never holds a `/` now, but a route that cannot match one would answer 404
    # for a worker that exists, as it did when ids were model names verbatim.
    @router.post("/workers/{worker_id:path}/restart")
    async def restart(request: Request, worker_id: str) -> JSONResponse:
        auth.authenticate(request)
        worker = worker_or_404(worker_id)
        worker.restart()
        return JSONResponse({"id": worker.id, "state": worker.state.value, "restarting": True}, 202)

    @router.get("/workers/{worker_id:path}/log")
    async def log(
        request: Request, worker_id: str, lines: int = 200, rank: int = 0
    ) -> PlainTextResponse:
        auth.authenticate(request)
        worker = worker_or_404(worker_id)
        lines = min(max(lines, 1), MAX_LOG_LINES)
        try:
            text = await worker.log_lines(lines, rank)
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        return PlainTextResponse("".join(f"{line}\n" for line in text))

    return router


def describe(worker: WorkerView) -> dict[str, Any]:
    """One worker as the admin API, the status page and `enginegate status` show it."""
    uptime = worker.uptime_seconds
    return {
        "id": worker.id,
        "model": worker.model,
        "backend": worker.backend,
        "state": worker.state.value,
        "devices": devices(worker),
        "gpus": list(worker.gpus),
        "port": worker.port,  # None for an engine on a Unix socket (`socket`) or external
        "socket": worker.socket,
        "pid": worker.pid,
        "url": worker.url,
        "uptime_seconds": round(uptime, 1) if uptime is not None else None,
        "restarts": worker.restarts,
        "last_start_seconds": worker.last_start_seconds,
        "in_flight": worker.in_flight,
        "last_error": list(worker.last_error),
        "replaces": worker.replaces,  # a rolling replacement: the worker this one succeeds
        "replaced_by": worker.replaced_by,
        "log": f"/admin/workers/{worker.id}/log",
    }


def devices(worker: WorkerView) -> str:
    if worker.gpus:
        return "gpu " + ",".join(map(str, worker.gpus))
    if worker.cpu_ranks:
        return "cpu " + " | ".join(worker.cpu_ranks)
    return "-" if ADAPTERS[worker.backend].has_process else "remote"


def models(gateway: Gateway) -> list[dict[str, Any]]:
    supervisor: Supervisor = gateway.supervisor
    out = []
    for spec in gateway.config.models:
        workers = supervisor.by_model(spec.name)
        out.append(
            {
                "name": spec.name,
                "backend": spec.backend,
                "tp": spec.tp,
                "pp": spec.pp,
                "replicas": len(workers),
                "replicas_ready": sum(w.is_ready for w in workers),
            }
        )
    return out


def totals(metrics: Metrics) -> dict[str, dict[str, float]]:
    """Counter totals and gauges by model, read from the metrics; the UI turns them into rates."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, labels, value in _samples(metrics.requests):
        if name.endswith("_total"):
            out["requests"][labels["model"]] += value
            if not labels["status"].startswith("2"):
                out["errors"][labels["model"]] += value
    for name, labels, value in _samples(metrics.tokens):
        if name.endswith("_total"):
            out[f"{labels['kind']}_tokens"][labels["model"]] += value
    for key, gauge in (("in_flight", metrics.in_flight), ("queued", metrics.queued)):
        for _, labels, value in _samples(gauge):
            out[key][labels["model"]] += value
    return {key: dict(values) for key, values in out.items()}


def _samples(metric: Any) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in metric.collect() for s in family.samples]
