"""The store on a real PostgreSQL server that these tests start: migrations, two gateways
sharing keys and usage, and the server stopped in the middle of traffic.

Needs Debian's `postgresql` package (deploy/test.sh installs it).
"""

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.keys import make_key
from gateway.store import Store, StoreDown, UsageRow

from .postgres import Postgres, bin_dir
from .servers import Spawner, free_port, start_upstream, wait_upstream
from .test_proxy import chat
from .test_tenancy import IN_FORCE, auth, within

ADMIN = "gw-pg-admin-key-1f1f"
PLAIN = "gw-pg-plain-key-2e2e"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    bins = bin_dir()
    if bins is None:
        pytest.skip("PostgreSQL is not installed: run deploy/test.sh (apt-get install postgresql)")
    server = Postgres(bins)
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_migrates_from_empty_and_from_the_previous_version(postgres: Postgres) -> None:
    """1. A database at version 1 holds a key; 2. migrate: the key is kept and usage can be
    written and read back grouped; 3. an empty database migrates straight to the newest."""
    store = Store(postgres.create_database("from_v1"), Path("/nonexistent"))
    assert store.migrate_to(1) == 1
    record, _ = make_key("alice", rpm=5, models=["m*"], expires="2027-06-30")
    store.create_key(record)
    assert store.migrate() == 2
    assert store.key("alice") == record
    day = 86400 * 20000
    store.add_usage(
        [
            UsageRow(day + 5, "alice", "m", "m-0", 200, 3, 4, 1, 0.1, 0.5, True),
            UsageRow(day + 3700, "alice", "m", "m-0", 499, 3, 2, 0, None, 0.5, False),
        ]
    )
    rows = store.usage(key="alice", by="hour")
    assert [(r["period"], r["completion_tokens"], r["incomplete"]) for r in rows] == [
        ("2024-10-04 00:00", 4, 0),
        ("2024-10-04 01:00", 2, 1),
    ]
    assert store.tokens_since(day) == {"alice": 12}
    store.close()
    fresh = Store(postgres.create_database("from_empty"), Path("/nonexistent"))
    assert fresh.migrate() == 2 and fresh.keys() == [] and fresh.version() == 0
    fresh.close()


def test_a_server_that_is_down_is_store_down(postgres: Postgres) -> None:
    port = free_port()
    store = Store(f"postgresql://eg@127.0.0.1:{port}/postgres", Path("/nonexistent"))
    with pytest.raises(StoreDown, match=f"127.0.0.1:{port}"):
        store.migrate()


class Gateways:
    def __init__(self, spawner: Spawner, tmp: Path, dsn: str, upstream_url: str) -> None:
        self.bases = []
        for name in ("a", "b"):
            port = free_port()
            config = tmp / f"{name}.yaml"
            config.write_text(f"""\
gateway:
  port: {port}
  state_dir: {tmp / name}
  database: "{dsn}"
  admin_keys: ["{ADMIN}"]
  api_keys: ["{PLAIN}"]
  drain_timeout: 1
models:
  - {{name: fake-model, backend: external, url: '{upstream_url}'}}
""")
            argv = [sys.executable, "-m", "gateway", "serve", "-c", str(config)]
            spawner.start(f"gateway-{name}", argv)
            self.bases.append(f"http://127.0.0.1:{port}")
        for name, base in zip("ab", self.bases, strict=True):
            spawner.wait_http(f"gateway-{name}", f"{base}/ready", timeout=30)


@pytest.fixture(scope="module")
def pair(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Postgres, Gateways]]:
    """Two gateways on one PostgreSQL database, over one scripted upstream."""
    tmp = tmp_path_factory.mktemp("pg-gateways")
    spawner = Spawner(tmp / "logs")
    try:
        upstream = start_upstream(spawner, "upstream")
        wait_upstream(spawner, upstream)
        dsn = postgres.create_database("shared")
        yield postgres, Gateways(spawner, tmp, dsn, upstream.url)
    finally:
        spawner.stop_all()


def post(base: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions", json=chat("fake-model"), headers=auth(key), timeout=10
    )


def test_two_gateways_share_keys_and_usage(pair: tuple[Postgres, Gateways]) -> None:
    """1. A key made on gateway A works on B within a second; 2. revoked on B, it is refused
    on A within a second; 3. usage from both is in the one store."""
    _, gateways = pair
    a, b = gateways.bases
    made = httpx.post(f"{a}/admin/keys", json={"name": "shared"}, headers=auth(ADMIN))
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    answered: list[int] = []

    def sent(base: str) -> int:
        answered.append(post(base, secret).status_code)
        return answered[-1]

    assert sent(a) == 200  # at once on the gateway that made it
    within(IN_FORCE, lambda: sent(b) == 200)
    revoked = httpx.delete(f"{b}/admin/keys/shared", headers=auth(ADMIN))
    assert revoked.json()["revoked"] is True
    within(IN_FORCE, lambda: sent(a) == 401)

    def both_counted() -> bool:
        rows = httpx.get(f"{b}/admin/usage?key=shared", headers=auth(ADMIN)).json()["data"]
        return bool(rows) and rows[0]["requests"] == answered.count(200)

    within(IN_FORCE, both_counted)


def test_stopping_postgres_mid_traffic_loses_nothing(pair: tuple[Postgres, Gateways]) -> None:
    """1. Traffic with a store key through gateway A; 2. PostgreSQL stops hard: requests keep
    being answered (the key is cached), /ready and the status say the store is down, usage
    waits in memory; 3. PostgreSQL starts again: every request's row reaches the store."""
    postgres, gateways = pair
    a = gateways.bases[0]
    made = httpx.post(f"{a}/admin/keys", json={"name": "steady"}, headers=auth(ADMIN)).json()
    secret = made["key"]
    within(IN_FORCE, lambda: post(a, secret).status_code == 200)
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(post(a, secret).status_code)
            time.sleep(0.02)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        time.sleep(0.5)
        postgres.stop("immediate")
        within(10, lambda: httpx.get(f"{a}/ready").json()["store"] == "down")
        tenancy = httpx.get(f"{a}/admin/status", headers=auth(ADMIN)).json()["tenancy"]
        assert tenancy["store"] == "down" and tenancy["error"]
        sent_while_down = len(statuses)
        time.sleep(1.5)
        assert len(statuses) > sent_while_down  # still answering
        waiting = httpx.get(f"{a}/admin/status", headers=auth(ADMIN)).json()["tenancy"]
        assert waiting["usage_waiting"] > 0
        assert httpx.get(f"{a}/admin/keys", headers=auth(ADMIN)).status_code == 503
    finally:
        stop.set()
        sender.join()
        postgres.start()
    assert set(statuses) == {200}, statuses
    total = len(statuses) + 1  # and the one that proved the key works

    def all_written() -> bool:
        rows = httpx.get(f"{a}/admin/usage?key=steady", headers=auth(ADMIN))
        return rows.status_code == 200 and sum(r["requests"] for r in rows.json()["data"]) == total

    within(20, all_written)
    within(IN_FORCE, lambda: httpx.get(f"{a}/ready").json()["store"] == "up")
