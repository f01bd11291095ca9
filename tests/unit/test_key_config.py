"""`gateway.api_keys` entries as strings or mappings, and `gateway.database`."""

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.keys import digest
from gateway.tenancy import config_keys

MODELS = """\
models:
  - {name: r1-distill, backend: external, url: "http://127.0.0.1:9/v1"}
  - {name: qwen-7b, backend: external, url: "http://127.0.0.1:9/v1", aliases: [chat]}
"""


def write(tmp_path: Path, keys: str, extra: str = "") -> Path:
    path = tmp_path / "enginegate.yaml"
    path.write_text(f"gateway:\n{extra}  api_keys:\n{keys}{MODELS}")
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    return str(caught.value)


def test_strings_and_mappings_become_records(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '    - "plain-secret-1"\n'
        '    - {name: alice, key: "alice-secret", models: [r1-distill, "qwen-*"], rpm: 60,\n'
        "       tpm: 200000, max_concurrent: 8, tokens_per_day: 2000000,\n"
        "       tokens_per_month: 40000000, priority: high, expires: 2027-06-30}\n",
    )
    plain, alice = config_keys(load_config(path, {}).gateway)
    assert (plain.name, plain.models, plain.rpm) == ("key-0", None, None)
    assert plain.digest == digest("plain-secret-1")
    assert alice.name == "alice" and alice.models == ("r1-distill", "qwen-*")
    assert (alice.rpm, alice.tpm, alice.max_concurrent) == (60, 200000, 8)
    assert (alice.tokens_per_day, alice.tokens_per_month) == (2000000, 40000000)
    assert alice.priority == "high" and str(alice.expires) == "2027-06-30"
    assert alice.allows("qwen-7b") and not alice.allows("llama")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('{name: a, key: "s", rpm: 0}', "gateway.api_keys[0].rpm: Input should be greater than 0"),
        ('{name: a, key: "s", priority: urgent}', "gateway.api_keys[0].priority: Input should be"),
        ('{name: a, key: "s", expires: someday}', "gateway.api_keys[0].expires:"),
        ('{name: a, key: "s", models: [llama-*]}', "api_keys[0].models: `llama-*` names no"),
        ('{name: a, key: "s", colour: red}', "gateway.api_keys[0].colour: unknown key"),
        ('{key: "s"}', "gateway.api_keys[0].name: required, missing"),
        ('{name: "a b", key: "s"}', "gateway.api_keys[0].name: String should match"),
        ('{name: a, key: " "}', "gateway.api_keys[0].key: the key is empty"),
    ],
)
def test_bad_entries_name_the_field(tmp_path: Path, entry: str, says: str) -> None:
    message = error(write(tmp_path, f"    - {entry}\n"))
    assert says in message and "enginegate.yaml" in message


def test_names_and_secrets_must_differ(tmp_path: Path) -> None:
    twice = '    - "abc"\n    - {name: key-0, key: "other"}\n'
    assert "two keys are named key-0" in error(write(tmp_path, twice))
    same = '    - "abc"\n    - {name: b, key: "abc"}\n'
    assert "the same key is listed twice" in error(write(tmp_path, same))


def test_database_is_sqlite_or_postgresql(tmp_path: Path) -> None:
    keys = '    - "abc"\n'
    assert "gateway.database: expected sqlite or a postgresql://" in error(
        write(tmp_path, keys, "  database: mysql://x\n")
    )
    config = load_config(write(tmp_path, keys, "  database: postgresql://eg@db/eg\n"), {})
    assert config.gateway.database == "postgresql://eg@db/eg"
