"""enginegate serve | check | plan | status | render | --version. Thin: parse, load config, call."""

import argparse
import asyncio
import json
import logging
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
import uvloop

from backends import ray_launch
from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.ports import PortAllocator
from backends.sockets import WorkerSocket
from backends.statedir import StateDirError, claim
from backends.supervisor import Supervisor, Timings, Worker
from gateway import __version__, changes_cli, keys_cli, plan, render, status
from gateway.app import create_app, make_client
from gateway.config import Config, ConfigError
from gateway.connections import connection_cap, guarded_protocol, raise_fd_limit
from gateway.logs import setup_logging
from gateway.progress import Progress
from gateway.proxy import Proxy
from gateway.rollout import Busy, Rollout

log = logging.getLogger("enginegate")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="enginegate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"enginegate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (
        ("serve", "start every worker and serve the OpenAI API"),
        ("check", "validate the config and print each worker's placement"),
    ):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("-c", "--config", default="enginegate.yaml", help="config file")
        plan.add_selection(sub)
        if name == "check":
            sub.add_argument(
                "--reload",
                action="store_true",
                help="show what reloading the file would change in the running gateway",
            )
    plan.add_arguments(commands.add_parser("plan", help="GPUs per replica and whether it fits"))
    status.add_arguments(commands.add_parser("status", help="a running gateway's workers"))
    render.add_arguments(commands.add_parser("render", help="the config as Kubernetes manifests"))
    keys_cli.add_arguments(
        commands.add_parser("keys", help="API keys in the store: create, list, show, ..."),
        commands.add_parser("usage", help="tokens and requests per key and model"),
    )
    changes_cli.add_arguments(
        commands.add_parser("reload", help="apply the config file's changes to the running gateway")
    )
    changes_cli.add_arguments(
        commands.add_parser("restart", help="replace a model's workers (or one), one by one"),
        "name",
    )
    args = parser.parse_args(argv)
    if args.command == "render":
        sys.exit(render.run(args))
    if args.command in ("keys", "usage"):
        sys.exit(keys_cli.run_keys(args) if args.command == "keys" else keys_cli.run_usage(args))
    if args.command == "status":
        sys.exit(status.run(args))
    if args.command == "reload":
        sys.exit(changes_cli.run_reload(args))
    if args.command == "restart":
        sys.exit(changes_cli.run_restart(args))
    if args.command == "check" and args.reload:
        args.url = args.admin_key = None
        args.timeout = 60.0
        sys.exit(changes_cli.run_reload(args, dry_run=True))
    if args.command == "plan":
        sys.exit(plan.run(args))
    try:
        fleet = plan.prepare(args)
        fleet.refuse(args.config)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    config, slots = fleet.config, fleet.slots
    if args.command == "check":
        print(describe_plan(slots, config.gateway.state_dir))
        return
    try:
        # Held until the process exits: one gateway per state directory.
        lock = claim(config.gateway.state_dir, str(Path(args.config).resolve()))
    except StateDirError as exc:
        sys.exit(f"error: {exc}")
    is_tty = sys.stderr.isatty()
    setup_logging(is_tty)
    # uvicorn picks uvloop only when it owns the loop; here we own it, so pick it ourselves
    # (10-30 % less CPU per request in bench/clients.py).
    uvloop.run(serve(config, slots, is_tty))
    lock.release()


async def serve(config: Config, slots: list[Slot], is_tty: bool) -> None:
    g = config.gateway
    client = make_client(config)
    progress = Progress(sys.stderr, is_tty)
    timings = Timings(stop_grace=g.stop_grace)
    worker_type: Callable[..., Worker] = Worker
    if config.cluster is not None:
        # The actors of every rank belong to this process from here on: Ray ends them,
        # and their guards the engines, when it exits (backends/ray_launch.py).
        ray_launch.connect(config.cluster)
        worker_type = ray_launch.worker_type(config.cluster)
    supervisor = Supervisor(
        slots, g.state_dir, client, progress.on_change, timings, config.secret_env, worker_type
    )
    app = create_app(config, supervisor, client)
    max_connections = connection_cap(g.max_connections, raise_fd_limit())
    uvicorn_config = uvicorn.Config(
        app, host=g.host, port=g.port, log_config=None, access_log=g.access_log,
        http=guarded_protocol(g.header_timeout, max_connections),
        timeout_keep_alive=g.keepalive_timeout,  # type: ignore[arg-type]  # uvicorn takes floats
    )  # fmt: skip
    server = DrainingServer(uvicorn_config, app.state.gateway.proxy, g.drain_timeout)
    log.info(
        "enginegate %s on http://%s:%d with %d workers; logs in %s",
        __version__, g.host, g.port, len(slots), g.state_dir / "logs",
    )  # fmt: skip
    shown = asyncio.create_task(progress.run(supervisor, _curl_hint(config)))
    # uvicorn re-raises the signal that stopped it once it is done; after a clean stop that
    # should end the process with status 0, not a signal death, so it lands on a no-op.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    # The same way for SIGHUP: the handler only schedules the reload on the loop.
    loop, rollout = asyncio.get_running_loop(), app.state.rollout
    signal.signal(signal.SIGHUP, lambda *_: loop.call_soon_threadsafe(handle_sighup, rollout))
    try:
        await server.serve()
    finally:
        shown.cancel()
        if config.cluster is not None:
            ray_launch.disconnect()


def handle_sighup(rollout: Rollout) -> None:
    """Reload the config file; the outcome goes to the log (a signal has no one to answer)."""
    try:
        plan = rollout.reload()
    except (ConfigError, Busy) as exc:
        log.error("SIGHUP: reload refused, nothing changed: %s", exc)
        return
    log.info("SIGHUP: reloading:\n%s", plan.describe())


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before it stops.

    First SIGTERM/SIGINT: /ready turns 503 and new requests get 503 while the socket stays
    open; requests in flight get what is left of `drain_timeout` (the whole drain: 0 waits for
    nothing), then uvicorn stops, cancelling what still runs, and the lifespan stops the
    engines. A second signal stops at once: no more waiting, and the engines' guards kill
    their trees when the gateway exits.
    """

    def __init__(self, config: uvicorn.Config, proxy: Proxy, drain_timeout: float) -> None:
        super().__init__(config)
        self.proxy = proxy
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.proxy.is_draining:
            log.warning("second signal: stopping at once")
            self.should_exit = self.force_exit = True
            return
        self.proxy.is_draining = True
        asyncio.get_running_loop().call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._drain_then_exit())
        )

    async def _drain_then_exit(self) -> None:
        log.info(
            "draining: %d requests in flight, up to %g s", self.proxy.pending, self.drain_timeout
        )
        deadline = time.monotonic() + self.drain_timeout
        while self.proxy.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.proxy.pending:
            log.warning("drain timed out with %d requests in flight", self.proxy.pending)
        # What is left of the drain bounds uvicorn's own wait for open requests (its None
        # would mean no bound at all).
        self.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())  # type: ignore[assignment]
        self.should_exit = True


def describe_plan(slots: list[Slot], state_dir: Path) -> str:
    """The placement as `enginegate check` prints it; ports are examples, serve picks anew.
    Nothing is made: a socket path is where it will be (or, too long, what it looks like)."""
    ports = PortAllocator()
    lines = []
    for slot in slots:
        spec = slot.model
        adapter = ADAPTERS[spec.backend]
        on_socket = adapter.listens_on_socket
        port = 0 if on_socket else ports.allocate()
        side_ports = tuple(ports.allocate() for _ in range(adapter.side_ports(spec)))
        socket_path = WorkerSocket(state_dir, slot.worker_id).planned if on_socket else None
        launch = adapter.launch(slot, port, "<per-worker secret>", side_ports, socket_path)
        devices = (
            f"gpus {','.join(map(str, slot.gpus))}"
            if slot.gpus
            else f"cpu ranks {' | '.join(slot.cpu_ranks)}"
            if slot.cpu_ranks
            else "none"
        )
        lines.append(
            f"{slot.worker_id}: model {spec.name} ({spec.backend}, tp={spec.tp} pp={spec.pp}), "
            f"{devices}"
        )
        lines.append(f"  url   {launch.base_url}")
        if launch.socket_path:
            lines.append(f"  via   unix socket {launch.socket_path}")
        if launch.argv:
            lines.append(f"  argv  {shlex.join(launch.argv)}")
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in launch.env.items())
            lines.append(f"  env   {env}")
    return "\n".join(lines)


def _curl_hint(config: Config) -> str:
    g = config.gateway
    host = "127.0.0.1" if g.host in ("0.0.0.0", "::") else g.host
    auth = "" if not g.api_keys else ' -H "Authorization: Bearer $ENGINEGATE_API_KEY"'
    message = {"role": "user", "content": "Hello!"}
    body = json.dumps({"model": config.models[0].name, "messages": [message]})
    return (
        f"curl http://{host}:{g.port}/v1/chat/completions{auth}"
        f" -H 'Content-Type: application/json' -d '{body}'"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
