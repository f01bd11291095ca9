"""KeyRing: Bearer keys to key names; only digests are kept."""

import hashlib

import pytest
from starlette.requests import Request

from gateway.auth import KeyRing
from gateway.errors import Unauthorized

KEYS = ["sk-alpha-1111", "sk-beta-2222"]


def request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/models", "headers": headers})


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("Bearer sk-alpha-1111", "key-0"),
        ("Bearer sk-beta-2222", "key-1"),
        ("bearer sk-beta-2222", "key-1"),
        ("Bearer  sk-alpha-1111 ", "key-0"),
    ],
)
def test_right_key_gives_its_name(header: str, name: str) -> None:
    assert KeyRing(KEYS).authenticate(request(header)) == name


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("Bearer", "missing API key"),
        ("Bearer ", "missing API key"),
        ("Basic sk-alpha-1111", "missing API key"),
        ("sk-alpha-1111", "missing API key"),
        ("Bearer sk-alpha-111", "invalid API key"),
        ("Bearer sk-alpha-1111x", "invalid API key"),
        ("Bearer SK-ALPHA-1111", "invalid API key"),
    ],
)
def test_wrong_missing_or_malformed_header_is_unauthorized(header: str | None, says: str) -> None:
    with pytest.raises(Unauthorized, match=says) as caught:
        KeyRing(KEYS).authenticate(request(header))
    assert caught.value.status == 401
    assert caught.value.code == "invalid_api_key"
    assert "sk-alpha-1111" not in str(caught.value)


def test_principal_is_none_for_unknown_keys() -> None:
    ring = KeyRing(KEYS)
    assert ring.principal("sk-alpha-1111") == "key-0"
    assert ring.principal("nope") is None


def test_open_ring_lets_anyone_in() -> None:
    ring = KeyRing([])
    assert ring.is_open
    assert ring.authenticate(request(None)) == "anonymous"
    assert not KeyRing(KEYS).is_open


def test_only_digests_are_stored() -> None:
    ring = KeyRing(KEYS)
    stored = repr(vars(ring))
    for key in KEYS:
        assert key not in stored
        assert key.encode().hex() not in stored
        assert hashlib.sha256(key.encode()).digest() in [d for _, d in ring._digests]
