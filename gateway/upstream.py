"""The proxy's HTTP client to the engines: one pooled aiohttp session, no overall timeout.

aiohttp rather than httpx on the hot path: httpcore's pool scans every pooled connection on
each request and release, which was 45-70 % of the gateway's busy time under load, and
`python -m bench.clients` measures aiohttp at a fraction of httpx's CPU per request. httpx stays
for the supervisor's probes and the metrics scrape, a request every few seconds.

Failures are sorted here, once, into what the proxy may retry on another replica (the request
never reached an engine) and what it must not (an engine may be working on it already).
"""

import aiohttp

from gateway import __version__
from gateway.errors import GatewayError, UpstreamFailed, UpstreamTimeout

# identity: the relay passes bytes through and never a content-encoding header. Naming the
# user agent also keeps aiohttp off its slower path for skipped default headers.
HEADERS = {"accept-encoding": "identity", "user-agent": f"enginegate/{__version__}"}


class Upstream:
    """Created lazily inside the running loop (aiohttp wants that); close() at shutdown."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        # sock_read bounds the wait for the first byte and every gap between chunks; a stream
        # itself may run for as long as the engine keeps sending.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # No pool limit: admission limits load. Idle connections are dropped before
                # uvicorn's 5 s keep-alive (every engine serves with it) would close them
                # under a request that is just being sent.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                timeout=self._timeout,
                auto_decompress=False,  # bytes are relayed as they come (and come uncompressed)
            )
        return await self._session.post(url, data=body, headers=HEADERS | headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def sort_failure(exc: Exception, worker_id: str) -> tuple[GatewayError, bool]:
    """(the error for the client, whether another replica may take the request).

    Connect refused or timed out, or the connection dropped before an answer: the engine did
    not start on it, so retry. No first byte in time: the engine may be generating, so a
    second replica would do the work twice; 504.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"worker {worker_id}: connect timed out"), True
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"worker {worker_id} did not answer in time"), False
    return UpstreamFailed(f"worker {worker_id}: {type(exc).__name__}: {exc}"), True


# What an upstream exchange can raise: aiohttp's errors, and timeouts (TimeoutError is one).
FAILURES = (aiohttp.ClientError, TimeoutError)
