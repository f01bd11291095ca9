"""Finding 19 (found while fixing the review): vLLM guards only /v1, /v2, /inference and
/cohere with its key, so /invocations on a loopback port ran inference for any local user.

vLLM workers now serve on a Unix socket in a 0700 directory (backends/sockets.py) and listen
on no TCP port for HTTP. These look at the real engines of the shared gateway: where their
HTTP server listens, who may connect, and that the key still guards /v1 on the socket.
"""

import socket
import stat
from pathlib import Path

import psutil
import pytest
from fakes.gateway_process import engine_http
from fakes.other_user import connect_as_nobody

WORKERS = [("tiny-0", "tiny"), ("tiny-tp2-0", "tiny-tp2")]
# Any HTTP server answers this at once, with an error for the body if not before.
INVOCATIONS = (
    b"POST /invocations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
)


def tcp_listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket the processes `pids` listen on."""
    found = []
    for pid in pids:
        try:
            sockets = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for s in sockets:
            if s.status == psutil.CONN_LISTEN and s.laddr:
                found.append((pid, s.laddr.ip, s.laddr.port))
    return found


def first_bytes(address: str, port: int) -> bytes:
    """What a listener sends back to POST /invocations within 2 s (b"" for nothing)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(INVOCATIONS)
            return conn.recv(16)
    except OSError:  # refused, reset or timed out: not an HTTP server
        return b""


@pytest.mark.parametrize(("worker_id", "model"), WORKERS)
def test_a_vllm_worker_listens_on_a_private_socket_and_no_tcp_port(
    running_gateway, worker_id: str, model: str
) -> None:
    """1. The admin API shows the worker's socket and no port; the socket lies in
    state_dir/run/, which is 0700. 2. vLLM's API server (its HTTP server) listens on no TCP
    port, and no TCP listener of the engine's tree (torch.distributed's own) answers
    POST /invocations with HTTP. 3. Through the socket, /v1/models without the key is 401."""
    gw = running_gateway
    worker = gw.worker(worker_id)
    path = Path(worker["socket"])
    assert worker["port"] is None
    assert path.parent == gw.state_dir / "run" and path.is_socket()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    assert tcp_listeners({gw.engine_of(model).pid}) == []
    answered = {
        (pid, port): reply
        for pid, address, port in tcp_listeners(gw.tree_of(model))
        if (reply := first_bytes(address, port)).startswith(b"HTTP/")
    }
    assert answered == {}, f"TCP listeners of {worker_id}'s engine answer HTTP: {answered}"

    with engine_http(str(path), timeout=30) as engine:
        refused = engine.get("http://localhost/v1/models")
        assert refused.status_code == 401, refused.text
        assert engine.get("http://localhost/health").status_code == 200  # it is the engine


@pytest.mark.parametrize(("worker_id", "model"), WORKERS)
def test_another_local_user_cannot_connect_to_a_vllm_worker(
    running_gateway, worker_id: str, model: str
) -> None:
    """`nobody` connecting to the worker's socket is refused by the kernel: no /invocations,
    /tokenize or anything else of the engine for other local users."""
    path = running_gateway.worker(worker_id)["socket"]
    assert connect_as_nobody(path) == "PermissionError"
