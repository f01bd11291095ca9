"""Loopback TCP ports for workers.

A port is free when we can bind it on 127.0.0.1 right now. The kernel picks it (port 0), and
the allocator remembers what it handed out, so two workers started in the same second never
get the same port even before either engine has bound it.
"""

import socket


class PortAllocator:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._handed_out: set[int] = set()

    def allocate(self) -> int:
        """A port that is not bound now and that this allocator has not handed out."""
        for _ in range(100):
            port = _free_port(self.host)
            if port not in self._handed_out:
                self._handed_out.add(port)
                return port
        raise RuntimeError("no free loopback port after 100 tries")

    def release(self, port: int) -> None:
        self._handed_out.discard(port)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
