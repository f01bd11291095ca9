"""A store that is locked: cached keys keep serving, usage waits in memory (bounded) and is
written once the store is back. Real SQLite, locked by a second connection."""

import sqlite3
from pathlib import Path

import pytest
from starlette.requests import Request

from gateway import manage
from gateway.config import Config
from gateway.errors import Unauthorized
from gateway.store import Store, UsageRow
from gateway.tenancy import Tenancy


def config() -> Config:
    return Config.model_validate(
        {
            "gateway": {"api_keys": ["plain-key"]},
            "models": [{"name": "m", "backend": "external", "url": "http://127.0.0.1:9/v1"}],
        }
    )


def bearer(token: str) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/x", "headers": headers})


def row(key: str) -> UsageRow:
    return UsageRow(1.0, key, "m", "m-0", 200, 3, 4, 0, 0.1, 0.2, True)


async def test_locked_store_keeps_cached_keys_and_buffers_usage(tmp_path: Path) -> None:
    """1. A store key is cached; 2. another connection locks the database; 3. the key still
    authenticates, usage cannot be written and waits, the state says down; 4. the lock goes:
    the next flush writes every row and the state is up again."""
    store = Store("sqlite", tmp_path)
    tenancy = Tenancy([], store, allow_open=False)
    await tenancy.start()
    _, secret = manage.create(store, config(), "alice", {})
    await tenancy.poll()
    assert tenancy.authenticate(bearer(secret)).name == "alice"
    assert tenancy.store_state == "up"

    lock = sqlite3.connect(tmp_path / "enginegate.db")
    lock.execute("BEGIN EXCLUSIVE")
    for _ in range(3):
        tenancy.record(row("alice"))
    assert not await tenancy.usage.flush()
    assert tenancy.store_state == "down" and "locked" in (tenancy.store_error or "")
    assert tenancy.authenticate(bearer(secret)).name == "alice"
    assert len(tenancy.usage.waiting) == 3
    lock.rollback()
    lock.close()

    assert await tenancy.usage.flush()
    assert tenancy.store_state == "up" and not tenancy.usage.waiting
    assert store.tokens_since(0) == {"alice": 21}
    await tenancy.stop()


async def test_waiting_usage_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    tenancy = Tenancy([], Store("sqlite", tmp_path), allow_open=False)
    tenancy.usage.max_waiting = 2
    for key in ("a", "b", "c"):
        tenancy.record(row(key))
    assert [r.key for r in tenancy.usage.waiting] == ["b", "c"]
    assert tenancy.usage.dropped == 1


async def test_an_open_gateway_closes_once_the_store_holds_a_key(tmp_path: Path) -> None:
    store = Store("sqlite", tmp_path)
    tenancy = Tenancy([], store, allow_open=True)
    await tenancy.start()
    nobody = Request({"type": "http", "method": "POST", "path": "/v1/x", "headers": []})
    assert tenancy.is_open and tenancy.authenticate(nobody).name == "anonymous"
    _, secret = manage.create(store, config(), "first", {})
    await tenancy.poll()
    assert not tenancy.is_open
    with pytest.raises(Unauthorized, match="missing API key"):
        tenancy.authenticate(nobody)
    assert tenancy.authenticate(bearer(secret)).name == "first"
    await tenancy.stop()
