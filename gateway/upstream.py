"""The proxy's HTTP client to the engines, and the one place that knows it is aiohttp.

aiohttp rather than httpx on the hot path: httpcore's pool scans every pooled connection on
each request and release, which was 45-70 % of the gateway's busy time under load, and
`python -m bench.clients` measures aiohttp at a fraction of httpx's CPU per request. httpx stays
for the supervisor's probes and the metrics scrape, a request every few seconds.

Nothing of aiohttp leaves this module: `post` returns an `UpstreamResponse`, and every failure,
opening or reading, comes out as an UpstreamError that names the worker and not its address
(the details go to the log). Failures before an answer are sorted here, once, into those
another replica may take (`may_retry`: the request never reached an engine) and those it must
not take (an engine may be working on it already).

Engines on TCP share one pooled session; an engine on a Unix socket (vLLM, so that no other
local user reaches it: backends/sockets.py) gets a session of its own through that socket.
"""

import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp

from gateway import __version__
from gateway.errors import UpstreamError, UpstreamFailed, UpstreamTimeout

log = logging.getLogger("enginegate.gateway")

# identity: the relay passes bytes through and never a content-encoding header. Naming the
# user agent also keeps aiohttp off its slower path for skipped default headers.
HEADERS = {"accept-encoding": "identity", "user-agent": f"enginegate/{__version__}"}

# What an exchange can raise: aiohttp's errors, and timeouts (TimeoutError is one).
FAILURES = (aiohttp.ClientError, TimeoutError)


class Upstream:
    """Sessions are created lazily inside the running loop (aiohttp wants that): one for every
    engine on TCP, one per Unix socket. close() at shutdown."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        # sock_read bounds the wait for the first byte and every gap between chunks; a stream
        # itself may run for as long as the engine keeps sending.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}  # by socket path, None: TCP

    def set_timeouts(self, connect_timeout: float, read_timeout: float) -> None:
        """For the requests from now on (a reload); sessions open already follow too."""
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )

    async def post(
        self,
        worker_id: str,
        url: str,
        body: bytes,
        headers: dict[str, str],
        socket_path: str | None = None,
        method: str = "POST",
    ) -> "UpstreamResponse":
        """The engine's answer once its status and headers are in; its body is not read yet.
        With `socket_path`, the request goes through that Unix socket (`url` gives the path)."""
        session = self._session(socket_path)
        try:
            response = await session.request(
                method, url, data=body, headers=HEADERS | headers, timeout=self._timeout
            )
        except FAILURES as exc:
            where = f"{url} via {socket_path}" if socket_path else url
            log.warning("worker %s at %s: %s: %s", worker_id, where, type(exc).__name__, exc)
            raise sort_failure(exc, worker_id) from None
        return UpstreamResponse(response, worker_id)

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    def _session(self, socket_path: str | None) -> aiohttp.ClientSession:
        session = self._sessions.get(socket_path)
        if session is None or session.closed:
            # No pool limit: admission limits load. Idle connections are dropped before
            # uvicorn's 5 s keep-alive (every engine serves with it) would close them under a
            # request that is just being sent.
            connector: aiohttp.BaseConnector
            if socket_path is None:
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
            else:
                connector = aiohttp.UnixConnector(socket_path, limit=0, keepalive_timeout=4)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,  # bytes are relayed as they come (and come uncompressed)
            )
            self._sessions[socket_path] = session
        return session


class UpstreamResponse:
    """An engine's answer: status and headers, then its body read whole or chunk by chunk."""

    def __init__(self, response: aiohttp.ClientResponse, worker_id: str) -> None:
        self._response = response
        self.worker_id = worker_id
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self, limit: int) -> bytes:
        """The whole body; UpstreamFailed past `limit` bytes, which are not kept."""
        response = self._response
        try:
            length = response.content_length
            if length is None:
                body = bytearray()
                async for piece in response.content.iter_any():
                    body += piece
                    if len(body) > limit:
                        break
                else:
                    return bytes(body)
            elif length <= limit:
                return await response.read()  # aiohttp reads no more than the length
        except FAILURES as exc:
            raise self._failed(exc, "while answering") from None
        raise UpstreamFailed(f"worker {self.worker_id} answered more than {limit} bytes")

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in whatever pieces the socket gives."""
        return _Chunks(self)

    def close(self) -> None:
        """Give the connection up: back to the pool after a whole body, otherwise closed, which
        makes the engine abort the request. Any number of times."""
        self._response.close()

    def _failed(self, exc: BaseException, during: str) -> UpstreamError:
        log.warning("worker %s failed %s: %s: %s", self.worker_id, during, type(exc).__name__, exc)
        if isinstance(exc, TimeoutError):
            message = "sent nothing for longer than the gateway's read_timeout"
            return UpstreamTimeout(f"worker {self.worker_id} {message}")
        return UpstreamFailed(f"worker {self.worker_id} failed {during} ({type(exc).__name__})")


class _Chunks:
    """aiohttp's own `iter_any()`, with its failures translated: no extra layer per chunk."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response
        self._read = response._response.content.readany

    def __aiter__(self) -> "_Chunks":
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._read()
        except FAILURES as exc:
            raise self._response._failed(exc, "mid-stream") from None
        if not chunk:
            raise StopAsyncIteration
        return chunk


def sort_failure(exc: Exception, worker_id: str) -> UpstreamError:
    """The error for a request that got no answer, and whether another replica may take it.

    Connect refused or timed out, or the connection dropped before an answer: the engine did
    not start on it, so retry. No first byte in time: the engine may be generating, so a
    second replica would do the work twice; 504. The message names the worker, never its
    address (security review finding 15).
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"worker {worker_id}: connect timed out", may_retry=True)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"worker {worker_id} did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return UpstreamFailed(f"worker {worker_id} could not be reached", may_retry=True)
    failure = f"worker {worker_id} failed before answering ({type(exc).__name__})"
    return UpstreamFailed(failure, may_retry=True)
