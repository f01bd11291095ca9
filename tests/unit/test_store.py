"""The store on real SQLite files: migrations (from empty and from version 1), keys, usage."""

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.keys import make_key, updated
from gateway.store import MIGRATIONS, KeyExists, Store, StoreDown, UsageRow


def row(key: str, at: float, tokens: int = 10, status: int = 200, **over: object) -> UsageRow:
    fields: dict[str, object] = dict(
        at=at, key=key, model="m", worker="m-0", status=status, prompt_tokens=tokens,
        completion_tokens=tokens, reasoning_tokens=0, ttft=0.1, duration=0.5, complete=True,
    )  # fmt: skip
    fields.update(over)
    return UsageRow(**fields)  # type: ignore[arg-type]


def test_migrates_an_empty_store_to_the_newest_version_in_wal_mode(tmp_path: Path) -> None:
    store = Store("sqlite", tmp_path)
    assert store.migrate() == len(MIGRATIONS)
    assert store.migrate() == len(MIGRATIONS)  # a second run changes nothing
    store.close()
    with sqlite3.connect(tmp_path / "enginegate.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"api_keys", "changes", "usage", "schema_version"} <= tables


def test_migrates_from_the_previous_version_keeping_keys(tmp_path: Path) -> None:
    """1. A store at version 1 (keys only) holds a key; 2. migrate; 3. the key is still
    there and usage can be written."""
    store = Store("sqlite", tmp_path)
    assert store.migrate_to(1) == 1
    record, _ = make_key("alice", rpm=5, models=["m*"])
    store.create_key(record)
    store.close()
    store = Store("sqlite", tmp_path)
    assert store.migrate() == 2
    assert store.key("alice") == record
    store.add_usage([row("alice", time.time())])
    assert store.tokens_since(0) == {"alice": 20}


def test_key_changes_bump_the_version(tmp_path: Path) -> None:
    store = Store("sqlite", tmp_path)
    store.migrate()
    start = store.version()
    record, _ = make_key("alice", expires="2027-06-30", priority="high")
    store.create_key(record)
    with pytest.raises(KeyExists):
        store.create_key(make_key("alice")[0])
    store.save_key(updated(record, rpm=9, enabled=False))
    assert store.version() == start + 2
    saved = store.key("alice")
    assert saved is not None and saved.rpm == 9 and not saved.enabled
    assert saved.expires is not None and saved.expires.isoformat() == "2027-06-30"
    assert [k.name for k in store.keys()] == ["alice"]
    assert store.key("nobody") is None


def test_usage_is_grouped_and_filtered(tmp_path: Path) -> None:
    store = Store("sqlite", tmp_path)
    store.migrate()
    day = 86400 * 20000  # midnight UTC
    store.add_usage(
        [
            row("alice", day + 10, tokens=5),
            row("alice", day + 3700, tokens=7, status=499, complete=False),
            row("bob", day + 20, tokens=1, model="other"),
            row("alice", day + 86400 + 5, tokens=100),
        ]
    )
    by_day = store.usage(key="alice", by="day")
    assert [(r["period"], r["requests"], r["prompt_tokens"]) for r in by_day] == [
        ("2024-10-04", 2, 12),
        ("2024-10-05", 1, 100),
    ]
    assert by_day[0]["errors"] == 1 and by_day[0]["incomplete"] == 1
    by_hour = store.usage(key="alice", since=day, until=day + 86400, by="hour")
    assert [r["period"] for r in by_hour] == ["2024-10-04 00:00", "2024-10-04 01:00"]
    assert [r["key"] for r in store.usage(model="other")] == ["bob"]
    assert store.tokens_since(day + 86400) == {"alice": 200}


def test_an_unusable_database_is_store_down(tmp_path: Path) -> None:
    (tmp_path / "enginegate.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreDown, match="enginegate.db"):
        Store("sqlite", tmp_path).migrate()


def test_dsn_password_is_not_shown(tmp_path: Path) -> None:
    store = Store("postgresql://eg:s3cret@db.example:5432/eg", tmp_path)
    assert store.describe() == "postgresql://db.example:5432/eg"


def test_two_stores_migrating_at_once_both_end_at_the_newest(tmp_path: Path) -> None:
    stores = [Store("sqlite", tmp_path) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda store: store.migrate(), stores))
    assert versions == [len(MIGRATIONS)] * 4
