"""`enginegate status`: a running gateway's models, workers and GPUs as tables in the terminal.

It reads GET /admin/status, the same data as the status page. The gateway is found from
`--url`, or from the config file's host and port; the admin key from `--admin-key`, else
$ENGINEGATE_ADMIN_KEY, else the config file's first admin key.
"""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.config import Config, ConfigError, load_config

ENV_KEY = "ENGINEGATE_ADMIN_KEY"
ERROR_LINES = 5  # of a worker's last error, shown under the tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-c", "--config", help="config file of the gateway (default enginegate.yaml)"
    )
    where.add_argument("--url", help="the gateway's address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--admin-key", help=f"an admin key (default ${ENV_KEY})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")


def run(args: argparse.Namespace) -> int:
    """Print the tables; 0 if the gateway answered, 1 (with a message on stderr) if not."""
    config: Config | None = None
    if not args.url:
        path = args.config or "enginegate.yaml"
        try:
            config = load_config(path)
        except ConfigError as exc:
            return _fail(f"{exc}\n(or say where the gateway is with --url)")
    url = (args.url or base_url(config)).rstrip("/")
    key = args.admin_key or os.environ.get(ENV_KEY) or _first_admin_key(config)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(
            f"{url}/admin/status", headers=headers, timeout=args.timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach the gateway at {url}: {type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        hint = (
            f" (give an admin key with --admin-key or ${ENV_KEY})"
            if resp.status_code in (401, 403)
            else ""
        )
        return _fail(f"{url}/admin/status answered {resp.status_code}: {message(resp)}{hint}")
    print(render(resp.json(), url))
    return 0


def base_url(config: Config | None) -> str:
    assert config is not None
    host = config.gateway.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.gateway.port}"


def render(status: dict[str, Any], url: str) -> str:
    """The status as plain-text tables, as `enginegate status` prints it."""
    totals = status.get("totals", {})
    lines = [
        f"enginegate {status['version']} at {url}, up {duration(status['uptime_seconds'])}",
        "",
    ]
    model_rows = [
        [
            m["name"],
            m["backend"],
            f"{m['tp']}x{m['pp']}",
            f"{m['replicas_ready']}/{m['replicas']}",
            _count(totals, "requests", m["name"]),
            _count(totals, "errors", m["name"]),
            _count(totals, "prompt_tokens", m["name"])
            + _count(totals, "completion_tokens", m["name"]),
            _count(totals, "in_flight", m["name"]),
            _count(totals, "queued", m["name"]),
        ]
        for m in status["models"]
    ]
    head = [
        "MODEL",
        "BACKEND",
        "TPxPP",
        "READY",
        "REQUESTS",
        "ERRORS",
        "TOKENS",
        "IN FLIGHT",
        "QUEUED",
    ]
    lines += table(head, model_rows, right=frozenset(range(3, 9)))
    lines.append("")
    worker_rows = [
        [
            w["id"],
            w["model"],
            _state(w),
            w["devices"],
            _where(w),
            _dash(w["pid"]),
            duration(w["uptime_seconds"]),
            w["restarts"],
            "-" if w["last_start_seconds"] is None else f"{w['last_start_seconds']:.1f}s",
            w["in_flight"],
        ]
        for w in status["workers"]
    ]
    head = [
        "WORKER",
        "MODEL",
        "STATE",
        "DEVICES",
        "PORT",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST START",
        "IN FLIGHT",
    ]
    lines += table(head, worker_rows, right=frozenset(range(4, 10)))
    if status.get("gpus"):
        lines.append("")
        gpu_rows = [
            [
                g["index"],
                g["name"],
                f"{g['used_bytes'] / 2**30:.1f} / {g['total_bytes'] / 2**30:.1f} GiB",
            ]
            for g in status["gpus"]
        ]
        lines += table(["GPU", "NAME", "MEMORY USED"], gpu_rows, right=frozenset({0, 2}))
    for w in status["workers"]:
        if w["last_error"]:
            lines += ["", f"last error lines of {w['id']} ({w['log']}):"]
            lines += [f"  {line}" for line in w["last_error"][-ERROR_LINES:]]
    return "\n".join(lines)


def table(
    head: Sequence[str], rows: Sequence[Sequence[Any]], right: frozenset[int] = frozenset()
) -> list[str]:
    """Columns padded to their widest cell; numbers (the `right` columns) right-aligned."""
    cells = [[str(c) for c in head], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def line(row: list[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return [line(row) for row in cells]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{s % 60}s" if minutes else f"{s}s"


def _count(totals: dict[str, dict[str, float]], key: str, model: str) -> int:
    return int(totals.get(key, {}).get(model, 0))


def _state(worker: dict[str, Any]) -> str:
    """`draining -> tiny-0.1` for a worker being replaced."""
    successor = worker.get("replaced_by")
    return f"{worker['state']} -> {successor}" if successor else str(worker["state"])


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def _where(worker: dict[str, Any]) -> Any:
    """The PORT column: the port, `unix` for an engine on a Unix socket, else `-`."""
    return "unix" if worker["port"] is None and worker.get("socket") else _dash(worker["port"])


def message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


def _first_admin_key(config: Config | None) -> str | None:
    return config.gateway.admin_keys[0] if config and config.gateway.admin_keys else None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
