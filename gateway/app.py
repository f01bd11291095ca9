"""create_app: the FastAPI application, wired from objects passed in (no module singletons).

The lifespan starts the supervisor (every worker) and stops it after uvicorn has stopped
taking requests, so uvicorn's own SIGINT/SIGTERM handling drives the whole shutdown.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from backends.supervisor import Supervisor
from gateway import __version__
from gateway.admin import AdminAuth, admin_router
from gateway.admin_changes import changes_router
from gateway.admin_keys import keys_router
from gateway.config import Config
from gateway.errors import install_handlers
from gateway.hotpath import GatewayApp
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.on_demand import OnDemand
from gateway.origin import allowed_hosts
from gateway.proxy import Proxy
from gateway.rollout import Rollout
from gateway.routes import router
from gateway.routing import make_policy
from gateway.scrape import EngineScraper, metrics_router
from gateway.settings import priority_models
from gateway.state import Gateway
from gateway.store import Store
from gateway.tenancy import Tenancy, config_keys
from gateway.ui import router as ui_router
from gateway.upstream import Upstream


def create_app(
    config: Config, supervisor: Supervisor, client: httpx.AsyncClient, store: Store | None = None
) -> FastAPI:
    """`client` serves the supervisor's probes and the metrics scrape; the proxy has its own.
    `store` holds keys and usage; by default the one `gateway.database` names."""
    metrics = Metrics(supervisor)
    admissions = {
        m.name: Admission(m.max_in_flight, m.max_queue, m.queue_timeout) for m in config.models
    }
    policies = {m.name: make_policy(m.routing, m.prefix_chars) for m in config.models}
    g = config.gateway
    upstream = Upstream(g.connect_timeout, g.read_timeout)
    proxy = Proxy(supervisor, upstream, metrics, admissions, policies, g.max_body_bytes)
    proxy.send_timeout = g.send_timeout
    proxy.aliases = {alias: m.name for m in config.models for alias in m.aliases}
    store = store or Store(g.database, g.state_dir)
    is_open = g.allow_unauthenticated and not g.api_keys
    tenancy = proxy.tenancy = Tenancy(config_keys(g), store, is_open)
    proxy.is_fair = g.queueing == "fair"
    proxy.priority_models = priority_models(config)
    gateway = Gateway(config, supervisor, tenancy, metrics, proxy)
    rollout = Rollout(gateway)
    on_demand = OnDemand(gateway)
    proxy.waiter = on_demand.waiter

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await tenancy.start()
        tasks = [asyncio.create_task(tenancy.run()), asyncio.create_task(tenancy.usage.run())]
        await supervisor.start()
        on_demand.start()
        try:
            yield
        finally:
            proxy.is_draining = True
            await on_demand.stop()
            await rollout.stop()
            await supervisor.stop()
            for task in tasks:
                task.cancel()
            await tenancy.stop()
            await upstream.close()
            await client.aclose()

    app = GatewayApp(
        title="enginegate",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # no map of the routes for whoever asks without a key
    )
    app.gateway = app.state.gateway = gateway
    app.state.rollout = rollout
    # Open mode: a web page must not drive the gateway cross-site (keys stop that otherwise).
    app.allowed_hosts = None if g.api_keys else allowed_hosts(g.host, g.port)
    install_handlers(app)
    app.include_router(router)
    scraper = EngineScraper(supervisor, metrics.registry)
    app.include_router(metrics_router(metrics, scraper, config.gateway.metrics_token))
    admin = gateway.admin = AdminAuth(config.gateway.admin_keys, gateway.keys)
    app.include_router(admin_router(gateway, admin, metrics.gpus))
    app.include_router(keys_router(gateway, admin))
    app.include_router(changes_router(rollout, admin))
    app.include_router(ui_router)
    return app


def make_client(config: Config) -> httpx.AsyncClient:
    """The client for probes and scrapes (the proxy's requests go through gateway.upstream)."""
    g = config.gateway
    timeout = httpx.Timeout(connect=g.connect_timeout, read=g.read_timeout, write=60, pool=None)
    return httpx.AsyncClient(timeout=timeout, trust_env=False)
