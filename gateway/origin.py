"""Open mode's guard against web pages: a request must be addressed to this gateway.

A gateway without API keys (`allow_unauthenticated: true`) answers whoever reaches it, and any
web page a local user opens can reach it: the page may POST to http://127.0.0.1:8000 (a
"simple" cross-site request), and through DNS rebinding (a name of the attacker's that resolves
to 127.0.0.1) even read the answers. Both give themselves away: the `Origin` is the other site,
or the `Host` is the attacker's name. So in open mode a request must carry, in `Host` and in
`Origin` when it has one, a loopback name or the configured host, with or without the port;
anything else is a 403 (security review finding 18). With API keys this is not needed: a page
does not have the key.
"""

from gateway.errors import Forbidden

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The `Host` values that name a gateway bound to `host`:`port` (lower case)."""
    configured = f"[{host}]" if ":" in host else host  # an IPv6 address is written bracketed
    names = {*LOOPBACK, configured.lower()}
    return frozenset(n for name in names for n in (name, f"{name}:{port}"))


def refusal(headers: list[tuple[bytes, bytes]], allowed: frozenset[str]) -> Forbidden | None:
    """Forbidden when `Host` or `Origin` names another site; None for a request to us."""
    host = origin = None
    for key, value in headers:  # lower-case names (ASGI)
        if key == b"host":
            host = value.decode("latin-1").lower()
        elif key == b"origin":
            origin = value.decode("latin-1").lower()
    if host is not None and host not in allowed:
        return Forbidden(f"the request is for host `{host}`; {_WHY}")
    if origin is not None and _origin_host(origin) not in allowed:
        return Forbidden(f"the request comes from the web page of `{origin}`; {_WHY}")
    return None


_WHY = (
    "without API keys the gateway answers only requests addressed to it by a loopback name "
    "or its configured host (a guard against other web sites and DNS rebinding)"
)


def _origin_host(origin: str) -> str:
    """`http://localhost:8000` → `localhost:8000`; "" for `null` or anything odd."""
    scheme, sep, host = origin.partition("://")
    return host if sep and scheme in ("http", "https") and "/" not in host else ""
