"""Client connections that cannot be hoarded: a deadline for headers and a cap on open sockets.

uvicorn closes an idle keep-alive connection only after a response; a connection that sends
nothing, or its headers a byte at a time, stays open for ever, and a thousand of them use up
the process's file descriptors (then neither clients nor engine restarts get one). So:

- a request's headers must be complete within `header_timeout` of the connection opening or
  of the previous response ending; otherwise the connection is closed;
- past `max_connections` open sockets, the oldest connection with no request in progress is
  closed to make room (the newcomer itself when every one is busy). The cap stays below the
  file-descriptor limit, with room for what the gateway itself opens (engines, logs, probes).
"""

import asyncio
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Descriptors kept for the gateway's own use: engine connections, log files, pipes, probes.
RESERVED_FDS = 256


def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one (as Go's runtime does); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int, fd_limit: int) -> int:
    """`wanted`, or less so that RESERVED_FDS descriptors stay free."""
    return max(16, min(wanted, fd_limit - RESERVED_FDS))


def guarded_protocol(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline and a connection cap (`http=`)."""
    opened: dict[GuardedProtocol, None] = {}  # insertion order: the oldest first
    attrs = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("GuardedHttp", (GuardedProtocol,), {**attrs, "opened": opened})


class GuardedProtocol(HttpToolsProtocol):
    header_timeout: float
    max_connections: int
    opened: dict["GuardedProtocol", None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened[self] = None
        self._arm_header_timer()
        if len(self.opened) > self.max_connections:
            victim = next((c for c in self.opened if c is not self and c.is_idle), self)
            victim.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.opened.pop(self, None)
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # a keep-alive connection starting its next request

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    @property
    def is_idle(self) -> bool:
        """No request of this connection is being answered."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
