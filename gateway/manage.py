"""Making, changing and revoking store keys: what `enginegate keys` and /admin/keys share.

Each call is one store transaction that bumps the change counter, so every gateway on the store
picks the change up at its next poll (tenancy.py). Blocking: the admin API runs these in a
thread.
"""

from dataclasses import replace
from typing import Any

from gateway.config import Config
from gateway.keys import KeyFieldError, KeyRecord, make_key, unknown_models, updated
from gateway.store import KeyExists, Store


class NoSuchKey(LookupError):
    pass


def create(
    store: Store, config: Config, name: str, fields: dict[str, Any]
) -> tuple[KeyRecord, str]:
    """A new key and its secret (shown once, never stored); raises KeyFieldError, KeyExists."""
    if name in config.gateway.key_names():
        raise KeyExists(f"a key named `{name}` is in the config file already")
    record, secret = make_key(name, **fields)
    _check_models(record, config)
    store.create_key(record)
    return record, secret


def update(store: Store, config: Config, name: str, fields: dict[str, Any]) -> KeyRecord:
    record = updated(_get(store, name), **fields)
    _check_models(record, config)
    store.save_key(record)
    return record


def revoke(store: Store, name: str) -> KeyRecord:
    """Revoked is for good (update can disable a key for a while instead)."""
    record = _get(store, name)
    record = replace(record, revoked=True)
    store.save_key(record)
    return record


def show(store: Store, name: str) -> KeyRecord:
    return _get(store, name)


def _get(store: Store, name: str) -> KeyRecord:
    record = store.key(name)
    if record is None:
        raise NoSuchKey(f"no key named `{name}` in the store")
    return record


def _check_models(record: KeyRecord, config: Config) -> None:
    known = {m.name for m in config.models} | {a for m in config.models for a in m.aliases}
    unknown = unknown_models(record.models, known)
    if unknown:
        raise KeyFieldError(
            f"models: `{unknown[0]}` names no configured model (models: {', '.join(sorted(known))})"
        )
