"""`enginegate keys create|list|show|update|revoke` and `enginegate usage`, on the store the
config file names (`gateway.database`). A running gateway picks a change up within a second.
"""

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from gateway import manage
from gateway.config import Config, ConfigError, load_config
from gateway.keys import PRIORITIES, KeyFieldError, KeyRecord
from gateway.store import KeyExists, Store, StoreDown

LIMIT_FLAGS = ("rpm", "tpm", "max_concurrent", "tokens_per_day", "tokens_per_month")
LIST_COLUMNS = ("name", "prefix", "owner", "models", "rpm", "tpm", "priority", "expires", "state")
USAGE_COLUMNS = (
    "period", "key", "model", "requests", "errors", "incomplete", "prompt_tokens",
    "completion_tokens", "reasoning_tokens", "avg_ttft_seconds",
)  # fmt: skip


def add_arguments(keys: argparse.ArgumentParser, usage: argparse.ArgumentParser) -> None:
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; prints its secret, once")
    _fields(create)
    for name, help in (("list", "every key"), ("show", "one key"), ("revoke", "revoke a key")):
        sub = actions.add_parser(name, help=help)
        if name != "list":
            sub.add_argument("name")
        _config(sub)
    update = actions.add_parser("update", help="change a key's fields")
    _fields(update)
    state = update.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="enabled", action="store_false", default=None)
    state.add_argument("--enable", dest="enabled", action="store_true")
    _config(usage)
    usage.add_argument("--key", help="one key's usage")
    usage.add_argument("--model", help="one model's usage")
    usage.add_argument("--since", help="from this time on (ISO date or date-time, UTC)")
    usage.add_argument("--until", help="up to this time (ISO date or date-time, UTC)")
    usage.add_argument("--by", choices=("hour", "day"), default="day")
    usage.add_argument("--json", action="store_true", help="JSON rows instead of a table")


def _config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="enginegate.yaml", help="config file")


def _fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("--owner")
    parser.add_argument("--models", help="comma-separated names and globs (default: every model)")
    for flag in LIMIT_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int)
    parser.add_argument("--priority", choices=PRIORITIES)
    parser.add_argument("--expires", help="last day the key works, e.g. 2027-06-30")
    _config(parser)


def run_keys(args: argparse.Namespace) -> int:
    config, store = _open(args.config)
    try:
        return _keys(args, config, store)
    except (KeyFieldError, KeyExists, manage.NoSuchKey, StoreDown) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _keys(args: argparse.Namespace, config: Config, store: Store) -> int:
    if args.action == "list":
        print(table(LIST_COLUMNS, [_summary(k) for k in store.keys()]))
    elif args.action == "show":
        print(json.dumps(manage.show(store, args.name).public(), indent=2, ensure_ascii=False))
    elif args.action == "revoke":
        manage.revoke(store, args.name)
        print(f"revoked {args.name}")
    elif args.action == "create":
        record, secret = manage.create(store, config, args.name, _given(args))
        print(f"created {record.name}; its secret, shown this once:\n{secret}")
    else:
        fields = _given(args)
        if args.enabled is not None:
            fields["enabled"] = args.enabled
        record = manage.update(store, config, args.name, fields)
        print(json.dumps(record.public(), indent=2, ensure_ascii=False))
    return 0


def run_usage(args: argparse.Namespace) -> int:
    config, store = _open(args.config)
    try:
        rows = store.usage(
            args.key,
            args.model,
            _time(args.since, "--since"),
            _time(args.until, "--until"),
            args.by,
        )
    except (StoreDown, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(
        json.dumps(rows, indent=2, ensure_ascii=False) if args.json else table(USAGE_COLUMNS, rows)
    )
    return 0


def _open(path: str) -> tuple[Config, Store]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    store = Store(config.gateway.database, config.gateway.state_dir)
    try:
        store.migrate()
    except StoreDown as exc:
        sys.exit(f"error: the store is unreachable: {exc}")
    return config, store


def _given(args: argparse.Namespace) -> dict[str, Any]:
    names = ("owner", "models", *LIMIT_FLAGS, "priority", "expires")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _summary(key: KeyRecord) -> dict[str, Any]:
    state = key.refusal()
    return {
        **key.public(),
        "models": ",".join(key.models) if key.models else "*",
        "state": "ok" if state is None else state.rsplit(" ", 1)[-1],
    }


def _time(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{flag}: expected a date or date-time like 2026-12-01, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def table(columns: Sequence[str], rows: list[dict[str, Any]]) -> str:
    """Rows as a plain text table with a header; `-` for what is None."""
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
