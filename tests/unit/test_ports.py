"""PortAllocator: never a port someone is listening on, never the same port twice."""

import socket
from collections.abc import Iterator

import pytest

from backends.ports import PortAllocator, is_bindable


@pytest.fixture
def listeners() -> Iterator[list[int]]:
    """Twenty loopback ports held by listening sockets for the length of a test."""
    socks = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        yield [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def test_never_hands_out_a_listening_port(listeners: list[int]) -> None:
    ports = PortAllocator()
    handed = [ports.allocate() for _ in range(200)]
    assert not set(handed) & set(listeners)
    assert all(is_bindable(port) for port in handed)


def test_never_hands_out_the_same_port_twice() -> None:
    # Nothing binds these ports, so the kernel is free to offer one again: only the
    # allocator's memory keeps them apart.
    ports = PortAllocator()
    handed = [ports.allocate() for _ in range(500)]
    assert len(set(handed)) == len(handed)


def test_a_released_port_may_be_handed_out_again() -> None:
    ports = PortAllocator()
    port = ports.allocate()
    ports.release(port)
    assert port not in ports._handed_out
    ports.release(port)  # releasing twice is harmless


def test_is_bindable_sees_listeners(listeners: list[int]) -> None:
    assert not any(is_bindable(port) for port in listeners)
