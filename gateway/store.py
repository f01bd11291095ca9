"""Where keys and usage live: SQLite in state_dir (the default) or PostgreSQL (`database:`).

One small SQL dialect serves both: `?` placeholders (turned into `%s` for psycopg), types both
know, and a bucket expression per engine. The schema is versioned (MIGRATIONS, applied in order
under a lock, so two gateways starting at once cannot both migrate). Every key change bumps
`changes.version`; gateways poll that one row to know when to reload their key cache.

Calls are blocking: the gateway makes them from worker threads (asyncio.to_thread), the CLI
directly. Any failure to reach or use the database is raised as StoreDown.
"""

import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gateway.keys import KeyRecord

MIGRATIONS: list[list[str]] = [
    [  # 1: keys, and the change counter gateways poll
        """CREATE TABLE api_keys (
            name TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
            owner TEXT, created DOUBLE PRECISION NOT NULL, expires TEXT, models TEXT,
            rpm BIGINT, tpm BIGINT, max_concurrent BIGINT, tokens_per_day BIGINT,
            tokens_per_month BIGINT, priority TEXT NOT NULL, enabled INTEGER NOT NULL,
            revoked INTEGER NOT NULL)""",
        "CREATE TABLE changes (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)",
        "INSERT INTO changes (id, version) VALUES (1, 0)",
    ],
    [  # 2: usage, one row per request
        """CREATE TABLE usage (
            at DOUBLE PRECISION NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL, worker TEXT,
            status INTEGER NOT NULL, prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL,
            ttft DOUBLE PRECISION, duration DOUBLE PRECISION NOT NULL,
            complete INTEGER NOT NULL)""",
        "CREATE INDEX usage_at ON usage (at)",
        "CREATE INDEX usage_key_at ON usage (key, at)",
    ],
]
KEY_COLUMNS = (
    "name", "digest", "prefix", "owner", "created", "expires", "models", "rpm", "tpm",
    "max_concurrent", "tokens_per_day", "tokens_per_month", "priority", "enabled", "revoked",
)  # fmt: skip


class StoreDown(Exception):
    """The database cannot be reached or used now (down, locked, refused)."""


class KeyExists(Exception):
    pass


@dataclass(frozen=True)
class UsageRow:
    at: float  # when the request ended (Unix time)
    key: str
    model: str
    worker: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    ttft: float | None
    duration: float
    complete: bool


USAGE_COLUMNS = tuple(f.name for f in fields(UsageRow))


class Store:
    """One database connection, used by one thread at a time."""

    def __init__(self, database: str, state_dir: Path) -> None:
        self.is_postgres = database.startswith(("postgresql://", "postgres://"))
        self.database = database
        self.path = state_dir / "enginegate.db"
        self._conn: Any = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        """Where the store is, for messages (a DSN's password is left out)."""
        if not self.is_postgres:
            return str(self.path)
        scheme, _, rest = self.database.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- schema

    def migrate(self) -> int:
        """Bring the schema to the newest version; the version it is at."""
        return self.migrate_to(len(MIGRATIONS))

    def migrate_to(self, target: int) -> int:
        with self._transaction() as cur:
            # One migrator at a time: the others wait here, then find the work done.
            if self.is_postgres:
                cur.execute("SELECT pg_advisory_xact_lock(7301)")
            else:
                cur.execute("BEGIN IMMEDIATE")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            current = row[0] if row else 0
            if row is None:
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (0)"))
            for version in range(current + 1, target + 1):
                for statement in MIGRATIONS[version - 1]:
                    cur.execute(statement)
                current = version
            cur.execute(self._sql("UPDATE schema_version SET version = ?"), (current,))
            return current

    # -- keys

    def version(self) -> int:
        with self._transaction() as cur:
            cur.execute("SELECT version FROM changes WHERE id = 1")
            return int(cur.fetchone()[0])

    def keys(self) -> list[KeyRecord]:
        with self._transaction() as cur:
            cur.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys ORDER BY name")
            return [_record(row) for row in cur.fetchall()]

    def key(self, name: str) -> KeyRecord | None:
        with self._transaction() as cur:
            cur.execute(
                self._sql(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys WHERE name = ?"), (name,)
            )
            row = cur.fetchone()
            return _record(row) if row else None

    def create_key(self, record: KeyRecord) -> None:
        """Add a key; raises KeyExists when the name is taken."""
        marks = ", ".join("?" for _ in KEY_COLUMNS)
        sql = f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES ({marks})"
        with self._transaction() as cur:
            cur.execute(self._sql("SELECT 1 FROM api_keys WHERE name = ?"), (record.name,))
            if cur.fetchone():
                raise KeyExists(f"a key named `{record.name}` exists already")
            cur.execute(self._sql(sql), _row(record))
            cur.execute("UPDATE changes SET version = version + 1 WHERE id = 1")

    def save_key(self, record: KeyRecord) -> None:
        """Write an existing key's fields (all but its name, digest and prefix)."""
        columns = KEY_COLUMNS[3:]
        sets = ", ".join(f"{c} = ?" for c in columns)
        values = _row(record)[3:]
        with self._transaction() as cur:
            cur.execute(
                self._sql(f"UPDATE api_keys SET {sets} WHERE name = ?"), (*values, record.name)
            )
            cur.execute("UPDATE changes SET version = version + 1 WHERE id = 1")

    # -- usage

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        marks = ", ".join("?" for _ in USAGE_COLUMNS)
        sql = self._sql(f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({marks})")
        with self._transaction() as cur:
            cur.executemany(sql, [_usage_values(row) for row in rows])

    def tokens_since(self, since: float) -> dict[str, int]:
        """Prompt + completion tokens per key from `since` (Unix time) on."""
        sql = (
            "SELECT key, SUM(prompt_tokens + completion_tokens) FROM usage WHERE at >= ? "
            "GROUP BY key"
        )
        with self._transaction() as cur:
            cur.execute(self._sql(sql), (since,))
            return {key: int(total or 0) for key, total in cur.fetchall()}

    def usage(
        self,
        key: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        by: str = "day",
    ) -> list[dict[str, Any]]:
        """Usage grouped by time bucket (`hour` or `day`), key and model, oldest first."""
        seconds = {"hour": 3600, "day": 86400}[by]
        bucket = (
            f"FLOOR(at / {seconds}) * {seconds}"
            if self.is_postgres
            else f"CAST(at / {seconds} AS INTEGER) * {seconds}"
        )
        where, params = [], []
        for clause, value in (
            ("key = ?", key),
            ("model = ?", model),
            ("at >= ?", since),
            ("at < ?", until),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = (
            f"SELECT {bucket} AS bucket, key, model, COUNT(*), "
            "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN complete = 0 THEN 1 ELSE 0 END), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(reasoning_tokens), "
            "AVG(ttft), AVG(duration) FROM usage"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " GROUP BY bucket, key, model ORDER BY bucket, key, model"
        )
        with self._transaction() as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
        names = (
            "requests",
            "errors",
            "incomplete",
            "prompt_tokens",
            "completion_tokens",
            "reasoning_tokens",
        )
        out = []
        for bucket_start, key_name, model_name, *numbers in rows:
            entry: dict[str, Any] = {
                "period": _period(float(bucket_start), by),
                "key": key_name,
                "model": model_name,
            }
            entry.update({n: int(v or 0) for n, v in zip(names, numbers[:6], strict=True)})
            ttft, duration = numbers[6], numbers[7]
            entry["avg_ttft_seconds"] = round(float(ttft), 3) if ttft is not None else None
            entry["avg_duration_seconds"] = (
                round(float(duration), 3) if duration is not None else None
            )
            out.append(entry)
        return out

    # -- plumbing

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.is_postgres else sql

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction, committed at the end, rolled back on error."""
        with self._lock:
            try:
                conn = self._connect()
                cur = conn.cursor()
                try:
                    yield cur
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                finally:
                    cur.close()
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
                raise StoreDown(f"{self.describe()}: {exc}") from None
            except Exception as exc:
                if self.is_postgres and _is_psycopg_error(exc):
                    self._drop()
                    raise StoreDown(f"{self.describe()}: {str(exc).strip()}") from None
                raise

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        if self.is_postgres:
            import psycopg  # only where PostgreSQL is used

            self._conn = psycopg.connect(self.database, connect_timeout=3)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=2, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        """Forget a connection that failed: the next call connects anew."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


def _is_psycopg_error(exc: Exception) -> bool:
    import psycopg

    return isinstance(exc, psycopg.Error)


def _row(record: KeyRecord) -> tuple[Any, ...]:
    values = asdict(record)
    values["expires"] = record.expires.isoformat() if record.expires else None
    values["models"] = json.dumps(list(record.models)) if record.models is not None else None
    values["enabled"] = int(record.enabled)
    values["revoked"] = int(record.revoked)
    return tuple(values[c] for c in KEY_COLUMNS)


def _record(row: Sequence[Any]) -> KeyRecord:
    values = dict(zip(KEY_COLUMNS, row, strict=True))
    values["expires"] = dt.date.fromisoformat(values["expires"]) if values["expires"] else None
    values["models"] = tuple(json.loads(values["models"])) if values["models"] else None
    values["enabled"] = bool(values["enabled"])
    values["revoked"] = bool(values["revoked"])
    values["created"] = float(values["created"])
    return KeyRecord(**values)


def _usage_values(row: UsageRow) -> tuple[Any, ...]:
    values = asdict(row)
    values["complete"] = int(row.complete)
    return tuple(values[c] for c in USAGE_COLUMNS)


def _period(start: float, by: str) -> str:
    moment = dt.datetime.fromtimestamp(start, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:00" if by == "hour" else "%Y-%m-%d")
