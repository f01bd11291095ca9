"""API keys as records: who may use which models, how much, and at what priority.

A key's secret is shown once, when it is made; afterwards only its SHA-256 digest and a short
prefix (`sk-eg-abcd…`, to recognise it in a list) are kept. Keys come from two places: the
config file (`gateway.api_keys`, strings or mappings) and the store (`enginegate keys create`,
`POST /admin/keys`). Both end up as a `KeyRecord`.
"""

import datetime as dt
import fnmatch
import hashlib
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

Priority = Literal["low", "normal", "high"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")
SECRET_PREFIX = "sk-eg-"
SHOWN_CHARS = 10  # `sk-eg-abcd`: enough to tell keys apart, far too little to guess one
LIMITS = ("rpm", "tpm", "max_concurrent", "tokens_per_day", "tokens_per_month")
# The fields `keys update` and PATCH /admin/keys/NAME may change.
EDITABLE = ("owner", "expires", "models", *LIMITS, "priority", "enabled")


class KeyFieldError(ValueError):
    """A key field that makes no sense; the message names the field."""


@dataclass(frozen=True)
class KeyRecord:
    name: str
    digest: str  # hex SHA-256 of the secret
    prefix: str  # the secret's first SHOWN_CHARS characters
    owner: str | None = None
    created: float = field(default_factory=time.time)
    expires: dt.date | None = None  # usable through this day (UTC)
    models: tuple[str, ...] | None = None  # names and globs; None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    priority: Priority = "normal"
    enabled: bool = True
    revoked: bool = False
    source: Literal["store", "config"] = "store"

    def refusal(self, now: float | None = None) -> str | None:
        """Why this key cannot be used now (revoked, disabled, expired), or None."""
        if self.revoked:
            return "this API key was revoked"
        if not self.enabled:
            return "this API key is disabled"
        if self.expires is not None and (now or time.time()) >= self._expired_at:
            return f"this API key expired on {self.expires.isoformat()}"
        return None

    @cached_property
    def _expired_at(self) -> float:
        """The Unix time the key stops working: the end of its `expires` day, UTC."""
        assert self.expires is not None
        end = dt.datetime.combine(self.expires + dt.timedelta(days=1), dt.time(), dt.UTC)
        return end.timestamp()

    def allows(self, model: str) -> bool:
        """May this key use `model` (a configured name or alias)?"""
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def public(self) -> dict[str, Any]:
        """What the admin API and the CLI show: everything but the digest."""
        out = asdict(self)
        del out["digest"]
        out["prefix"] = f"{self.prefix}…"
        out["expires"] = self.expires.isoformat() if self.expires else None
        out["models"] = list(self.models) if self.models is not None else None
        return out


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def make_key(name: str, secret: str | None = None, **fields: Any) -> tuple[KeyRecord, str]:
    """A new record and its secret (made here unless given); raises KeyFieldError on bad fields."""
    check_name(name)
    secret = secret if secret is not None else new_secret()
    record = KeyRecord(name=name, digest=digest(secret), prefix=secret[:SHOWN_CHARS])
    return updated(record, **fields), secret


def updated(record: KeyRecord, **fields: Any) -> KeyRecord:
    """`record` with `fields` changed, each checked; raises KeyFieldError naming the field."""
    unknown = set(fields) - set(EDITABLE)
    if unknown:
        raise KeyFieldError(
            f"{sorted(unknown)[0]}: not a key field (fields: {', '.join(EDITABLE)})"
        )
    clean = {name: _check(name, value) for name, value in fields.items()}
    return replace(record, **clean)


def check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 64:
        raise KeyFieldError("name: expected 1 to 64 characters")
    if not all(c.isalnum() or c in "-_.@" for c in name):
        raise KeyFieldError(f"name: {name!r} may hold only letters, digits and - _ . @")


def _check(name: str, value: Any) -> Any:
    if value is None:
        if name in ("priority", "enabled"):
            raise KeyFieldError(f"{name}: cannot be empty")
        return None
    if name in LIMITS:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KeyFieldError(f"{name}: expected a whole number above 0, got {value!r}")
        return value
    if name == "priority":
        if value not in PRIORITIES:
            raise KeyFieldError(f"priority: expected one of low, normal, high, got {value!r}")
        return value
    if name == "enabled":
        if not isinstance(value, bool):
            raise KeyFieldError(f"enabled: expected true or false, got {value!r}")
        return value
    if name == "expires":
        return parse_date(value)
    if name == "models":
        return _check_models(value)
    if not isinstance(value, str):  # owner
        raise KeyFieldError(f"{name}: expected text, got {value!r}")
    return value


def parse_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise KeyFieldError(f"expires: expected a date like 2027-06-30, got {value!r}") from None


def _check_models(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list | tuple) or not value:
        raise KeyFieldError("models: expected a list of model names or globs")
    if not all(isinstance(m, str) and m.strip() for m in value):
        raise KeyFieldError(f"models: every entry must be a model name or glob, got {value!r}")
    return tuple(value)


def unknown_models(patterns: tuple[str, ...] | None, known: set[str]) -> list[str]:
    """The entries of an allow-list that name no configured model (a typo, most likely)."""
    if patterns is None:
        return []
    return [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in known)]
