"""The real gateway process against clients that hoard connections or never leave.

Each test starts its own gateway (the settings under test differ) in front of one scripted
upstream, served as an `external` model: what is tested is the gateway's HTTP server and
shutdown, not an engine.
"""

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .servers import Spawner, Upstream, free_port, start_upstream, wait_upstream

KEY = "conn-test-key-5e1f"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = 1.0


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path / "logs")
    try:
        yield spawner
    finally:
        spawner.stop_all()


@pytest.fixture
def upstream(spawner: Spawner) -> Upstream:
    # Slow, long streams: a client can hold one open for as long as a test needs.
    up = start_upstream(spawner, "up", "--model", "m", "--interval", "0.1", "--chunks", "1000")
    wait_upstream(spawner, up)
    return up


def start(
    spawner: Spawner, tmp: Path, upstream: Upstream, prefix: list[str] | None = None, **gw: object
) -> str:
    """A gateway with `gw` added to its `gateway:` section; its base URL once /ready."""
    port = free_port()
    settings = {"header_timeout": HEADER_TIMEOUT, "stop_grace": 1, **gw}
    extra = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items())
    config = tmp / "enginegate.yaml"
    config.write_text(
        f"gateway:\n  port: {port}\n  api_keys: [{KEY}]\n  state_dir: {tmp / 'state'}\n{extra}"
        f"models:\n  - {{name: m, backend: external, url: '{upstream.url}'}}\n"
    )
    argv = [*(prefix or []), sys.executable, "-m", "gateway", "serve", "-c", str(config)]
    spawner.start("gateway", argv, {**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    spawner.wait_http("gateway", f"{base}/ready")
    return base


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def is_closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the gateway closes `sock` within `within` seconds (what it sends is skipped)."""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def hold_stream(base: str) -> socket.socket:
    """A streamed request whose client then reads nothing."""
    sock = connect(base)
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    assert sock.recv(64).startswith(b"HTTP/1.1 200"), "the stream did not start"
    return sock


def test_idle_and_half_sent_connections_are_closed(
    spawner: Spawner, upstream: Upstream, tmp_path: Path
) -> None:
    """Finding 3: a connection that sends nothing, or only part of its headers, is closed after
    header_timeout (it used to stay open for ever)."""
    base = start(spawner, tmp_path, upstream)
    idle = connect(base)
    partial = connect(base)
    partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert is_closed_by_peer(idle, HEADER_TIMEOUT + 3)
    assert is_closed_by_peer(partial, 1)
    # A keep-alive connection that starts a second request and stalls is closed the same way.
    kept = connect(base)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert kept.recv(1024).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /health HTTP/1.1\r\n")
    assert is_closed_by_peer(kept, HEADER_TIMEOUT + 3)
    for sock in (idle, partial, kept):
        sock.close()


def test_a_thousand_idle_connections_do_not_lock_out_a_client(
    spawner: Spawner, upstream: Upstream, tmp_path: Path
) -> None:
    """Finding 3: with 1,024 file descriptors, 1,000 idle unauthenticated connections used to
    leave nothing for a client with a key (empty replies, then 502s: the upstream connect
    failed with EMFILE). Past the connection cap the oldest idle ones are closed instead."""
    prlimit = ["prlimit", "--nofile=1024:1024", "--"]
    base = start(spawner, tmp_path, upstream, prlimit, header_timeout=60)
    hoard = [connect(base) for _ in range(1000)]
    try:
        for _ in range(3):
            answer = httpx.post(
                f"{base}/v1/chat/completions",
                headers=AUTH,
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
        closed = sum(is_closed_by_peer(sock, 0.001) for sock in hoard)
        assert closed > 200, "the cap should have closed the oldest idle connections"
    finally:
        for sock in hoard:
            sock.close()


@pytest.mark.parametrize("signals", [1, 2], ids=["drain_timeout 0", "second signal"])
def test_shutdown_does_not_wait_for_a_client_that_never_reads(
    spawner: Spawner, upstream: Upstream, tmp_path: Path, signals: int
) -> None:
    """Finding 12: with drain_timeout 0, SIGTERM used to wait for ever for a stream whose
    client never read; a second signal did not stop at once either."""
    drain = 0 if signals == 1 else 60
    base = start(spawner, tmp_path, upstream, drain_timeout=drain)
    held = hold_stream(base)
    gateway = spawner.procs["gateway"]
    began = time.monotonic()
    for _ in range(signals):
        gateway.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    gateway.wait(timeout=10)
    assert time.monotonic() - began < 5, spawner.log("gateway")
    held.close()
