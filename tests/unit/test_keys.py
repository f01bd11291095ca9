"""Key records: secrets shown once and kept as digests, allow-lists, refusals, field checks."""

import datetime as dt

import pytest

from gateway.keys import KeyFieldError, digest, make_key, unknown_models, updated


def test_secret_is_kept_only_as_digest_and_prefix() -> None:
    record, secret = make_key("alice")
    assert secret.startswith("sk-eg-") and len(secret) > 40
    assert record.digest == digest(secret) and secret not in repr(record)
    assert record.prefix == secret[:10]
    shown = record.public()
    assert "digest" not in shown and shown["prefix"] == secret[:10] + "…"
    assert make_key("bob")[1] != secret


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        (None, "anything", True),
        (("r1-distill", "qwen-*"), "qwen-7b", True),
        (("r1-distill", "qwen-*"), "r1-distill", True),
        (("r1-distill", "qwen-*"), "r1-distill-2", False),
        (("r1-distill", "qwen-*"), "QWEN-7b", False),
    ],
)
def test_allow_list_takes_names_and_globs(
    models: tuple[str, ...] | None, model: str, allowed: bool
) -> None:
    record, _ = make_key("k", models=list(models) if models else None)
    assert record.allows(model) is allowed


def test_refusal_names_why() -> None:
    record, _ = make_key("k", expires="2026-06-30")
    june_30 = dt.datetime(2026, 6, 30, 23, 59, tzinfo=dt.UTC).timestamp()
    assert record.refusal(june_30) is None
    assert "expired on 2026-06-30" in (record.refusal(june_30 + 120) or "")
    assert updated(record, enabled=False).refusal(june_30) == "this API key is disabled"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"rpm": 0}, "rpm: expected a whole number above 0"),
        ({"tpm": -5}, "tpm: expected a whole number above 0"),
        ({"max_concurrent": "8"}, "max_concurrent: expected a whole number"),
        ({"tokens_per_day": True}, "tokens_per_day: expected a whole number"),
        ({"priority": "urgent"}, "priority: expected one of low, normal, high"),
        ({"expires": "next year"}, "expires: expected a date like 2027-06-30"),
        ({"models": []}, "models: expected a list"),
        ({"models": ["ok", ""]}, "models: every entry"),
        ({"enabled": "yes"}, "enabled: expected true or false"),
        ({"color": "red"}, "color: not a key field"),
    ],
)
def test_nonsense_fields_are_named(fields: dict[str, object], says: str) -> None:
    with pytest.raises(KeyFieldError, match=says):
        make_key("k", **fields)


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "semi;colon"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(KeyFieldError, match="name:"):
        make_key(name)


def test_unknown_models_finds_patterns_that_match_nothing() -> None:
    known = {"r1-distill", "qwen-7b"}
    assert unknown_models(("qwen-*", "r1-distill"), known) == []
    assert unknown_models(("llama-*", "r1"), known) == ["llama-*", "r1"]
    assert unknown_models(None, known) == []
