"""Per-key limits, all in memory: requests and tokens per minute, concurrency, daily and monthly
token budgets.

Per-minute limits are token buckets (capacity: the limit; refilled at limit/60 a second), so a
key may burst to its limit and then goes at the steady rate. Token limits are charged in two
steps: an estimate at admission (prompt length and `max_tokens`), then, when the request ends,
the difference to what the engine reported. Budgets add what the store knows (every gateway's
usage, refreshed every few seconds) to what this gateway has not written yet.
"""

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Any

from gateway.errors import RateLimited
from gateway.keys import KeyRecord

DEFAULT_COMPLETION = 256  # tokens expected when a request sets no max_tokens
CHARS_PER_TOKEN = 4


class QuotaExceeded(RateLimited):
    """A spending budget is used up: OpenAI's code for it."""

    code = "insufficient_quota"


@dataclass
class Bucket:
    capacity: float
    level: float
    stamp: float  # when `level` was right

    def fill(self, now: float) -> None:
        rate = self.capacity / 60
        self.level = min(self.capacity, self.level + (now - self.stamp) * rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is in the bucket (0: it is)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / (self.capacity / 60)


@dataclass
class KeyUsage:
    """What one key holds now: its buckets, requests in flight, tokens reserved and used."""

    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0
    reserved: int = 0  # estimates of requests in flight
    used_day: int = 0  # settled today, not in the store's figure yet
    used_month: int = 0


class Quota:
    """The limits of every key, by name. `stored_day`/`stored_month` are the store's figures."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyUsage] = {}
        self.stored_day: dict[str, int] = {}
        self.stored_month: dict[str, int] = {}

    def admit(self, key: KeyRecord, estimate: int, now: float | None = None) -> None:
        """Take a request slot and reserve `estimate` tokens; RateLimited names the limit."""
        now = time.monotonic() if now is None else now
        state = self._state(key, now)
        if key.max_concurrent is not None and state.in_flight >= key.max_concurrent:
            raise RateLimited(
                f"key `{key.name}` reached its concurrency limit: max_concurrent "
                f"{key.max_concurrent} requests at once",
                retry_after=1,
            )
        if state.requests is not None:
            state.requests.fill(now)
            if state.requests.level < 1:
                raise RateLimited(
                    f"key `{key.name}` reached its rpm limit: {key.rpm} requests per minute",
                    retry_after=_seconds(state.requests.wait_for(1)),
                )
        if state.tokens is not None:
            state.tokens.fill(now)
            need = min(estimate, state.tokens.capacity)  # a huge request waits for a full bucket
            if state.tokens.level < need:
                raise RateLimited(
                    f"key `{key.name}` reached its tpm limit: {key.tpm} tokens per minute "
                    f"(this request may take {estimate})",
                    retry_after=_seconds(state.tokens.wait_for(need)),
                )
        self._check_budgets(key, state, estimate)
        if state.requests is not None:
            state.requests.level -= 1
        if state.tokens is not None:
            state.tokens.level -= estimate
        state.in_flight += 1
        state.reserved += estimate

    def settle(self, key: KeyRecord, estimate: int, used: int) -> None:
        """The request ended having used `used` tokens: give back its slot and the estimate."""
        state = self._state(key, time.monotonic())
        state.in_flight -= 1
        state.reserved -= estimate
        if state.tokens is not None:
            state.tokens.level += estimate - used  # may go below 0: the next ones wait for it
        state.used_day += used
        state.used_month += used

    def written(self, key: str, tokens: int) -> None:
        """`tokens` of `key` reached the store: count them as the store's until the next refresh
        reads them from there."""
        state = self.keys.get(key)
        if state is not None:
            state.used_day = max(0, state.used_day - tokens)
            state.used_month = max(0, state.used_month - tokens)
        self.stored_day[key] = self.stored_day.get(key, 0) + tokens
        self.stored_month[key] = self.stored_month.get(key, 0) + tokens

    def refreshed(self, day: dict[str, int], month: dict[str, int]) -> None:
        self.stored_day, self.stored_month = day, month

    def used_today(self, name: str) -> int:
        state = self.keys.get(name)
        return self.stored_day.get(name, 0) + (state.used_day if state else 0)

    def used_this_month(self, name: str) -> int:
        state = self.keys.get(name)
        return self.stored_month.get(name, 0) + (state.used_month if state else 0)

    def _check_budgets(self, key: KeyRecord, state: KeyUsage, estimate: int) -> None:
        day, month = key.tokens_per_day, key.tokens_per_month
        if day is not None and self.used_today(key.name) + state.reserved + estimate > day:
            self._refuse(key, "daily", day, self.used_today(key.name), state, estimate)
        if month is not None and self.used_this_month(key.name) + state.reserved + estimate > month:
            self._refuse(key, "monthly", month, self.used_this_month(key.name), state, estimate)

    def _refuse(
        self, key: KeyRecord, period: str, limit: int, used: int, state: KeyUsage, estimate: int
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        renews = next_day(now) if period == "daily" else next_month(now)
        name = "tokens_per_day" if period == "daily" else "tokens_per_month"
        raise QuotaExceeded(
            f"key `{key.name}` reached its {period} budget: {name} {limit} "
            f"({used} used, {state.reserved} reserved, this request may take {estimate})",
            retry_after=_seconds((renews - now).total_seconds()),
        )

    def _state(self, key: KeyRecord, now: float) -> KeyUsage:
        """The key's usage, its buckets resized (or dropped) when its limits changed."""
        state = self.keys.get(key.name)
        if state is None:
            state = self.keys[key.name] = KeyUsage()
        state.requests = _resized(state.requests, key.rpm, now)
        state.tokens = _resized(state.tokens, key.tpm, now)
        return state


def estimate_tokens(body: dict[str, Any], raw_length: int) -> int:
    """Tokens a request may use: its body's length over CHARS_PER_TOKEN, plus what it may write."""
    most = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = most if isinstance(most, int) and most > 0 else DEFAULT_COMPLETION
    return raw_length // CHARS_PER_TOKEN + completion


def next_day(now: dt.datetime) -> dt.datetime:
    return dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)


def next_month(now: dt.datetime) -> dt.datetime:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return dt.datetime(year, month, 1, tzinfo=dt.UTC)


def period_starts(now: dt.datetime) -> tuple[float, float]:
    """Unix times of the start of today and of this month (UTC)."""
    day = dt.datetime.combine(now.date(), dt.time(), dt.UTC)
    return day.timestamp(), day.replace(day=1).timestamp()


def _resized(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(limit, limit, now)
    if bucket.capacity != limit:
        bucket.capacity = limit
        bucket.level = min(bucket.level, limit)
    return bucket


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
