"""Whose socket listens on a worker's TCP port: backends/probe.py `listens_on`, and the check a
Ray rank's actor makes on its own node (backends/ray_worker.py `EngineHost.owns_port`), both
against real sockets and processes."""

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.probe import listens_on
from backends.ray_worker import EngineHost

NODE = "127.0.0.3"  # a node's cluster address, as in tests/fakes/ray_cluster.py


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind((NODE, 0))
    sock.listen()
    yield sock
    sock.close()


def test_a_socket_bound_to_the_node_address_is_seen_there_and_only_there(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    assert listens_on([os.getpid()], port, NODE)
    assert not listens_on([os.getpid()], port)  # 127.0.0.1: another user may bind it beside
    assert not listens_on([os.getpid()], port + 1, NODE)
    assert not listens_on([os.getppid()], port, NODE)  # not that process's socket


def test_a_socket_on_every_address_takes_the_node_address_too() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listens_on([os.getpid()], port, NODE)
        assert listens_on([os.getpid()], port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((NODE, 0))
        return int(sock.getsockname()[1])


def test_a_ranks_actor_tells_its_engines_socket_from_another_process(
    listener: socket.socket, tmp_path: Path
) -> None:
    """1. An EngineHost (the actor's body, here without Ray) starts an engine that listens on
    NODE:port in a child of its own (as vLLM's API server under the guard); 2. owns_port says
    yes for that port once it listens; 3. no for a port this test process holds."""
    port = free_port()
    script = (
        f"import socket, time\ns = socket.socket()\ns.bind(({NODE!r}, {port}))\n"
        "s.listen()\ntime.sleep(60)\n"
    )
    # The engine forks: the listening socket is its child's, as with vLLM's API server.
    argv = ["sh", "-c", f'{sys.executable} -c "$0"; sleep 60', script]
    host = EngineHost(argv, {}, str(tmp_path / "rank0.log"), grace=2)
    try:
        deadline = time.monotonic() + 15
        while not host.owns_port(NODE, port):
            assert time.monotonic() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.1)
        assert not host.owns_port(NODE, listener.getsockname()[1])
        assert not host.owns_port("127.0.0.1", port)
    finally:
        host.stop()
    assert not host.owns_port(NODE, port)  # its engine is gone
