"""Who may call, for which models, how much: the one place every proxied request is checked.

    authenticate(request) → KeyRecord      401: unknown, revoked, disabled or expired key
    admit(key, model, ...) → Grant         403: model not allowed; 429: a limit (quota.py)
    grant.finish(...)                      settle the token estimate, record the usage row

Keys are cached in memory (config keys, plus the store's), looked up by digest: the hot path
never waits for the database. A poll every POLL_SECONDS reads the store's change counter and
reloads the keys when it moved, so a key made, changed or revoked on any gateway sharing the
store takes effect here within a second. While the store is down the cached keys keep serving.
"""

import asyncio
import datetime as dt
import hmac
import logging
import time
from collections.abc import Iterable
from typing import Any

from fastapi import Request

from gateway.auth import bearer_token
from gateway.config import GatewayConfig
from gateway.errors import Forbidden, Unauthorized
from gateway.keys import SHOWN_CHARS, KeyRecord, digest
from gateway.quota import CHARS_PER_TOKEN, Quota, estimate_tokens, period_starts
from gateway.store import Store, StoreDown, UsageRow
from gateway.usage import UsageLog

log = logging.getLogger("enginegate.keys")

POLL_SECONDS = 0.5
REFRESH_SECONDS = 5  # budgets: how often the store's daily and monthly totals are read
ANONYMOUS = KeyRecord(name="anonymous", digest="", prefix="", source="config")


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class Grant:
    """One admitted request's hold on its key's limits; finish() runs once, at its end."""

    def __init__(
        self, tenancy: "Tenancy", key: KeyRecord, model: str, estimate: int, prompt: int
    ) -> None:
        self.tenancy = tenancy
        self.key = key
        self.model = model
        self.estimate = estimate  # tokens reserved at admission
        self.prompt = prompt  # of which the prompt, as estimated

    def cancel(self) -> None:
        """The request was refused after all (its model's queue was full): nothing was used."""
        self.tenancy.quota.settle(self.key, self.estimate, 0)

    def finish(
        self,
        status: int,
        usage: dict[str, Any] | None,
        chunks: int,
        worker: str | None,
        ttft: float | None,
        duration: float,
    ) -> None:
        prompt, completion, reasoning = _tokens(usage)
        complete = usage is not None and status < 400
        if usage is None:
            # No usage from the engine (an interrupted stream, an error): count what was sent,
            # a chunk a token, and the prompt as estimated.
            completion = chunks
            prompt = self.prompt
        self.tenancy.quota.settle(self.key, self.estimate, prompt + completion)
        row = UsageRow(
            at=time.time(), key=self.key.name, model=self.model, worker=worker, status=status,
            prompt_tokens=prompt, completion_tokens=completion, reasoning_tokens=reasoning,
            ttft=ttft, duration=duration, complete=complete,
        )  # fmt: skip
        self.tenancy.record(row)


class Tenancy:
    def __init__(self, config_keys: list[KeyRecord], store: Store, allow_open: bool) -> None:
        self.config_keys = config_keys
        self.store = store
        self.allow_open = allow_open  # no config keys and allow_unauthenticated
        self.quota = Quota()
        self.usage = UsageLog(store, self.quota.written, self._on_write)
        self.by_digest: dict[str, KeyRecord] = {}
        self.by_name: dict[str, KeyRecord] = {}
        self.version: int | None = None
        # Why the store is down, as the key poll and the usage writer last found it.
        self.errors: dict[str, str | None] = {"poll": "not opened yet", "write": None}
        self._refreshed = 0.0
        self._polling = asyncio.Lock()
        self._load([])

    @property
    def is_open(self) -> bool:
        """No key at all and allow_unauthenticated: anyone may call (origin.py guards that)."""
        return self.allow_open and not self.by_digest

    @property
    def store_error(self) -> str | None:
        return self.errors["poll"] or self.errors["write"]

    @property
    def store_state(self) -> str:
        return "down" if self.store_error else "up"

    # -- the hot path

    def authenticate(self, request: Request, what: str = "API key") -> KeyRecord:
        """The caller's key, from `Authorization: Bearer KEY`; raises Unauthorized."""
        if self.is_open:
            return ANONYMOUS
        token = bearer_token(request)
        if token is None:
            raise Unauthorized(f"missing {what}: send `Authorization: Bearer <key>`")
        return self.usable(token, what)

    def usable(self, token: str, what: str = "API key") -> KeyRecord:
        """The key `token` is, if it may be used now; raises Unauthorized saying why not."""
        key = self.find(token)
        if key is None:
            raise Unauthorized(f"invalid {what}")
        refusal = key.refusal()
        if refusal is not None:
            raise Unauthorized(refusal)
        return key

    def find(self, token: str) -> KeyRecord | None:
        # A dict finds the digest; compare_digest then confirms it in constant time. What the
        # lookup's timing could tell is about SHA-256 digests, not about any secret.
        presented = digest(token)
        key = self.by_digest.get(presented)
        if key is None or not hmac.compare_digest(presented, key.digest):
            return None
        return key

    def principal(self, token: str) -> str | None:
        """The name of the key `token` is, usable or not (the admin API tells them apart)."""
        key = self.find(token)
        return key.name if key else None

    def admit(
        self, key: KeyRecord, asked: str, model: str, body: dict[str, Any], size: int
    ) -> Grant:
        """Check `key` may send this request to `model` (asked for as `asked`) and take its
        share of the key's limits; raises ModelNotAllowed or RateLimited."""
        if not (key.allows(asked) or key.allows(model)):
            raise ModelNotAllowed(f"key `{key.name}` may not use model `{asked}`", "model")
        estimate = estimate_tokens(body, size)
        self.quota.admit(key, estimate)
        return Grant(self, key, model, estimate, size // CHARS_PER_TOKEN)

    def visible(self, key: KeyRecord, names: Iterable[str]) -> list[str]:
        return [name for name in names if key.allows(name)]

    def record(self, row: UsageRow) -> None:
        self.usage.add(row)

    def status(self) -> dict[str, Any]:
        """The store's state and each key's usage, for /admin/status and the status page."""
        keys = []
        for name in sorted(self.by_name):
            state = self.quota.keys.get(name)
            keys.append(
                {
                    "name": name,
                    "tokens_today": self.quota.used_today(name),
                    "tokens_this_month": self.quota.used_this_month(name),
                    "in_flight": state.in_flight if state else 0,
                }
            )
        return {
            "store": self.store_state,
            "where": self.store.describe(),
            "error": self.store_error,
            "usage_waiting": len(self.usage.waiting),
            "usage_dropped": self.usage.dropped,
            "keys": keys,
        }

    # -- keeping the cache fresh

    async def start(self) -> None:
        """Open the store (migrating it) and load its keys; a store that is down is retried."""
        try:
            await asyncio.to_thread(self.store.migrate)
            await self.poll()
        except StoreDown as exc:
            self._on_store(exc)

    async def run(self) -> None:
        """Poll for key changes and refresh budgets until cancelled."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                if self.version is None:
                    await asyncio.to_thread(self.store.migrate)
                await self.poll()
            except StoreDown as exc:
                self._on_store(exc)

    async def poll(self) -> None:
        """Reload the keys if the store's counter moved, and refresh budgets when due."""
        async with self._polling:  # the loop and an admin change: one at a time, in order
            await self._poll()

    async def _poll(self) -> None:
        version = await asyncio.to_thread(self.store.version)
        if version != self.version:
            keys = await asyncio.to_thread(self.store.keys)
            self._load(keys)
            self.version = version
        if time.monotonic() - self._refreshed >= REFRESH_SECONDS:
            day, month = period_starts(dt.datetime.now(dt.UTC))
            today = await asyncio.to_thread(self.store.tokens_since, day)
            this_month = await asyncio.to_thread(self.store.tokens_since, month)
            self.quota.refreshed(today, this_month)
            self._refreshed = time.monotonic()
        self._on_store(None)

    async def stop(self) -> None:
        if not await self.usage.flush():
            log.error("usage: %d rows could not be written at shutdown", len(self.usage.waiting))
        await asyncio.to_thread(self.store.close)

    def set_config_keys(self, keys: list[KeyRecord], allow_open: bool) -> None:
        """The config file's keys after a reload; the store's keys stay as they are."""
        self.config_keys, self.allow_open = keys, allow_open
        self._load([key for key in self.by_name.values() if key.source == "store"])

    def _load(self, stored: list[KeyRecord]) -> None:
        names = {key.name for key in self.config_keys}
        shadowed = [key.name for key in stored if key.name in names]
        if shadowed:
            log.warning("store keys %s are shadowed by config keys of the same name", shadowed)
        keys = self.config_keys + [key for key in stored if key.name not in names]
        self.by_digest = {key.digest: key for key in keys}
        self.by_name = {key.name: key for key in keys}

    def _on_store(self, error: StoreDown | None, source: str = "poll") -> None:
        message = str(error) if error else None
        was = self.store_error
        self.errors[source] = message
        if message and was != message:
            log.error("store down: %s", message)
        elif was is not None and self.store_error is None and self.version is not None:
            log.info("store %s is back", self.store.describe())

    def _on_write(self, error: StoreDown | None) -> None:
        self._on_store(error, "write")


def config_keys(gateway: GatewayConfig) -> list[KeyRecord]:
    """The keys of `gateway.api_keys`: a string is key-N with no limits, a mapping has its own."""
    out = []
    for name, entry in zip(gateway.key_names(), gateway.api_keys, strict=True):
        if isinstance(entry, str):
            out.append(KeyRecord(name, digest(entry), entry[:SHOWN_CHARS], source="config"))
            continue
        fields = entry.model_dump(exclude={"name", "key"})
        fields["models"] = tuple(entry.models) if entry.models is not None else None
        out.append(
            KeyRecord(name, digest(entry.key), entry.key[:SHOWN_CHARS], source="config", **fields)
        )
    return out


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    if not usage:
        return 0, 0, 0
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return tuple(  # type: ignore[return-value]
        value if isinstance(value, int) and value >= 0 else 0
        for value in (usage.get("prompt_tokens"), usage.get("completion_tokens"), reasoning)
    )
