"""Open mode: a request must be addressed to this gateway (gateway/origin.py, finding 18)."""

import pytest

from gateway.origin import allowed_hosts, refusal

ALLOWED = allowed_hosts("127.0.0.1", 8000)


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(b"user-agent", b"x"), *((k.encode(), v.encode()) for k, v in values.items())]


def test_allowed_hosts_are_loopback_names_and_the_configured_host_with_or_without_port():
    assert allowed_hosts("gw.internal", 9000) == {
        *("127.0.0.1", "localhost", "[::1]", "gw.internal"),
        *("127.0.0.1:9000", "localhost:9000", "[::1]:9000", "gw.internal:9000"),
    }
    assert "[::1]:8000" in allowed_hosts("::1", 8000)
    assert "[fd00::5]:8000" in allowed_hosts("fd00::5", 8000)


@pytest.mark.parametrize(
    "values",
    [
        {"host": "127.0.0.1:8000"},
        {"host": "LOCALHOST:8000"},
        {"host": "localhost"},
        {"host": "[::1]:8000", "origin": "http://localhost:8000"},
        {"host": "127.0.0.1:8000", "origin": "https://127.0.0.1"},
        {},  # no Host at all (HTTP/1.0 tools); no browser sends that
    ],
)
def test_requests_to_this_gateway_pass(values: dict[str, str]) -> None:
    assert refusal(headers(**values), ALLOWED) is None


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"host": "rebind.attacker.example"}, "for host `rebind.attacker.example`"),
        ({"host": "127.0.0.1:8001"}, "for host `127.0.0.1:8001`"),
        ({"host": "127.0.0.1:8000", "origin": "http://attacker.example"}, "attacker.example"),
        ({"host": "127.0.0.1:8000", "origin": "null"}, "`null`"),
        ({"host": "localhost:8000", "origin": "http://localhost.attacker.example"}, "attacker"),
    ],
)
def test_requests_for_another_site_are_refused(values: dict[str, str], says: str) -> None:
    error = refusal(headers(**values), ALLOWED)
    assert error is not None and error.status == 403
    assert says in error.message and "DNS rebinding" in error.message
