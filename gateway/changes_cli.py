"""`enginegate reload | restart` and `check --reload`: ask a running gateway to change.

They talk to the admin API (gateway/admin_changes.py), found and authenticated as
`enginegate status` finds it (`--url`, else the config file's host and port; the admin key
from `--admin-key`, $ENGINEGATE_ADMIN_KEY or the file's first admin key). The gateway reads
its own config file again; `-c` names that file.
"""

import argparse
import os
import sys
import time
from typing import Any

import httpx

from gateway import status
from gateway.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    if name:
        parser.add_argument(name, help="a model name, or one worker's id (e.g. tiny-0)")
    parser.add_argument("-c", "--config", default="enginegate.yaml", help="the gateway's file")
    parser.add_argument("--url", help="the gateway's address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--admin-key", help=f"an admin key (default ${status.ENV_KEY})")
    parser.add_argument("--no-wait", action="store_true", help="return once the change began")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")


def run_reload(args: argparse.Namespace, dry_run: bool = False) -> int:
    """Print the plan, then the outcome; 0 when applied (or, dry, when it can be)."""
    query = "dry_run=true" if dry_run else f"wait={'false' if args.no_wait else 'true'}"
    return _ask(args, f"/admin/reload?{query}")


def run_restart(args: argparse.Namespace) -> int:
    """`NAME`: a worker id when the gateway has one by that name, else a model."""
    try:
        workers = _call(args, "GET", "/admin/workers")["data"]
    except _Failed as exc:
        return _fail(str(exc))
    is_worker = any(w["id"] == args.name for w in workers)
    path = "workers/{}/replace" if is_worker else "models/{}/restart"
    wait = "false" if args.no_wait else "true"
    return _ask(args, f"/admin/{path.format(args.name)}?wait={wait}")


def _ask(args: argparse.Namespace, path: str) -> int:
    began = time.monotonic()
    try:
        body = _call(args, "POST", path)
    except _Failed as exc:
        return _fail(str(exc))
    if "text" in body:
        print(body["text"])
    if body.get("dry_run"):
        return 0
    for error in body.get("errors", []):
        print(f"error: {error}", file=sys.stderr)
    state = body.get("state", "?")
    print(f"{body.get('kind', 'change')} {state} in {time.monotonic() - began:.2f} s")
    return 1 if state == "failed" else 0


class _Failed(Exception):
    pass


def _call(args: argparse.Namespace, method: str, path: str) -> dict[str, Any]:
    config = None
    try:
        config = load_config(args.config)  # for the address and the admin key
    except ConfigError as exc:
        if not args.url:  # a broken file is the gateway's to report, once it is found
            raise _Failed(f"{exc}\n(or say where the gateway is with --url)") from None
    url = (args.url or status.base_url(config)).rstrip("/")
    key = args.admin_key or os.environ.get(status.ENV_KEY)
    if key is None and config is not None and config.gateway.admin_keys:
        key = config.gateway.admin_keys[0]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.request(
            method, url + path, headers=headers, timeout=args.timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        raise _Failed(f"cannot reach the gateway at {url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code >= 400:
        raise _Failed(f"{url}{path.split('?')[0]} answered {resp.status_code}: "
                      f"{status.message(resp)}")  # fmt: skip
    result: dict[str, Any] = resp.json()
    return result


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
