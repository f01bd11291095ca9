"""enginegate.yaml: every error names the file, the key path and what was expected."""

import json
import textwrap
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load_config, plan_workers

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-enginegate-test-secret-9f1c"

GATEWAY = f"""\
gateway:
  api_keys: ["{SECRET}"]
"""


def write(tmp_path: Path, text: str, name: str = "enginegate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ or {})
    message = str(caught.value)
    assert SECRET not in message, "an API key leaked into an error message"
    return message


def plan_error(path: Path, gpu_count: int = 4) -> str:
    config = load_config(path, {})
    with pytest.raises(ConfigError) as caught:
        plan_workers(config, str(path), gpu_count=gpu_count, cpu_cores=[0, 1])
    message = str(caught.value)
    assert SECRET not in message, "an API key leaked into an error message"
    return message


def test_tp_below_one_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + """\
models:
  - {name: a, backend: vllm, model: m, device: cpu}
  - {name: b, backend: vllm, model: m, device: cpu, tp: 0}
""",
    )
    message = load_error(path)
    assert message.startswith(f"{path}: models[1].tp: ")
    assert "greater than or equal to 1" in message
    assert "(got 0)" in message


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + """\
models:
  - {name: a, backend: vllm, model: m, device: cpu, tensor_parallel: 2}
""",
    )
    assert load_error(path) == f"{path}: models[0].tensor_parallel: unknown key"


def test_misspelt_top_level_key_reports_both_unknown_and_missing(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + "model:\n  - {name: a, backend: vllm, model: m}\n")
    problems = load_error(path).splitlines()
    assert f"{path}: model: unknown key" in problems
    assert f"{path}: models: required, missing" in problems


def test_missing_variable_names_the_variable_and_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
gateway:
  api_keys: ["${ENGINEGATE_KEY_THAT_IS_NOT_SET}"]
models:
  - {name: a, backend: vllm, model: m, device: cpu}
""",
    )
    message = load_error(path)
    assert message.startswith(f"{path}: gateway.api_keys[0]: ")
    assert "${ENGINEGATE_KEY_THAT_IS_NOT_SET} is not set" in message


def test_variable_defaults_apply_only_when_unset(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + """\
  port: ${GW_PORT:-8123}
  state_dir: ${GW_STATE:-/var/lib/enginegate}
models:
  - {name: a, backend: vllm, model: "${MODEL_DIR:-/models}/tiny", device: cpu}
""",
    )
    defaults = load_config(path, {})
    assert defaults.gateway.port == 8123
    assert defaults.gateway.state_dir == Path("/var/lib/enginegate")
    assert defaults.models[0].model == "/models/tiny"

    overridden = load_config(path, {"GW_PORT": "9000", "MODEL_DIR": "/srv"})
    assert overridden.gateway.port == 9000
    assert overridden.models[0].model == "/srv/tiny"


def test_double_dollar_is_a_literal_dollar(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + """\
models:
  - name: a
    backend: vllm
    model: m
    device: cpu
    env: {PROMPT: "costs $$5, not ${PRICE:-6}", RAW: "$$${HOME_DIR:-x}"}
""",
    )
    env = load_config(path, {"HOME_DIR": "/h"}).models[0].env
    assert env == {"PROMPT": "costs $5, not 6", "RAW": "$/h"}


def test_duplicate_model_names_point_at_the_second(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + """\
models:
  - {name: tiny, backend: vllm, model: m, device: cpu}
  - {name: tiny, backend: vllm, model: other, device: cpu}
""",
    )
    assert plan_error(path) == f"{path}: models[1].name: 'tiny' is already used by models[0]"


@pytest.mark.parametrize(
    "second, expected",
    [
        (
            "{name: r1, aliases: [tiny], backend: vllm, model: m, device: cpu}",
            "models[1].aliases[0]: 'tiny' is already used by models[0]",
        ),
        (
            "{name: deepseek, backend: vllm, model: m, device: cpu}",
            "models[1].name: 'deepseek' is already used by models[0].aliases[1]",
        ),
        (
            "{name: r1, aliases: [r1-a, r1-a], backend: vllm, model: m, device: cpu}",
            "models[1].aliases[1]: 'r1-a' is already used by models[1].aliases[0]",
        ),
    ],
    ids=["alias-of-a-name", "name-of-an-alias", "alias-twice"],
)
def test_names_and_aliases_are_unique_together(tmp_path: Path, second: str, expected: str) -> None:
    first = "{name: tiny, aliases: [tiny-chat, deepseek], backend: vllm, model: m, device: cpu}"
    path = write(tmp_path, GATEWAY + f"models:\n  - {first}\n  - {second}\n")
    assert plan_error(path) == f"{path}: {expected}"


def test_an_alias_is_a_name_clients_can_send(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY + "models:\n  - {name: r1, aliases: [a b], backend: external, url: http://x}\n",
    )
    assert "models[0].aliases[0]: String should match pattern" in load_error(path)


def test_overlapping_gpus_name_the_owner(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + """\
models:
  - {name: a, backend: vllm, model: m, tp: 2, gpus: [0, 1]}
  - {name: b, backend: vllm, model: m, tp: 2, gpus: [2, 1]}
""",
    )
    assert plan_error(path) == f"{path}: models[1].gpus[1]: GPU 1 is already given to models[0] (a)"


def test_gpu_index_beyond_the_machine(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY + "models:\n  - {name: a, backend: vllm, model: m, gpus: [4]}\n",
    )
    assert plan_error(path, gpu_count=4) == (
        f"{path}: models[0].gpus[0]: GPU 4 does not exist (this machine has 4: 0..3)"
    )


def test_gpus_must_match_tp_pp_replicas(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + "models:\n  - {name: a, backend: vllm, model: m, tp: 2, replicas: 2, gpus: [0,1]}",
    )
    message = load_error(path)
    assert message == f"{path}: models[0]: gpus has 2 entries, expected tp*pp*replicas = 4"


def test_external_needs_url(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + "models:\n  - {name: a, backend: external}\n")
    message = load_error(path)
    assert message.startswith(f"{path}: models[0]: backend 'external' needs url")


@pytest.mark.parametrize("flag", ["port", "--port", "api_key", "tensor_parallel_size"])
def test_managed_engine_flags_are_refused(tmp_path: Path, flag: str) -> None:
    path = write(
        tmp_path,
        GATEWAY
        + f"""\
models:
  - name: a
    backend: vllm
    model: m
    engine_args: {{max_model_len: 1024, "{flag}": "{SECRET}"}}
""",
    )
    message = load_error(path)  # also checks that the value is not echoed
    normalised = flag.lstrip("-").replace("_", "-")
    assert message == (
        f"{path}: models[0].engine_args: {normalised}: set by enginegate itself; "
        "remove from engine_args"
    )


def test_empty_api_key_is_refused_without_echoing_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
gateway:
  api_keys: ["{SECRET}", "${{UNSET_KEY:-}}"]
models:
  - {{name: a, backend: vllm, model: m, device: cpu}}
""",
    )
    message = load_error(path)
    assert message.startswith(f"{path}: gateway.api_keys: an API key is empty")


def test_no_api_keys_needs_allow_unauthenticated(tmp_path: Path) -> None:
    body = "models:\n  - {name: a, backend: vllm, model: m, device: cpu}\n"
    closed = write(tmp_path, "gateway: {port: 8000}\n" + body, "closed.yaml")
    message = load_error(closed)
    assert message.startswith(f"{closed}: gateway: api_keys is empty")
    assert "allow_unauthenticated: true" in message

    opened = write(tmp_path, "gateway: {allow_unauthenticated: true}\n" + body, "open.yaml")
    assert load_config(opened, {}).gateway.api_keys == []


def test_secrets_in_wrongly_typed_fields_are_not_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
gateway:
  api_keys: "{SECRET}"
models:
  - {{name: a, backend: external, url: "http://h/v1", api_key: ["{SECRET}"]}}
""",
    )
    problems = load_error(path).splitlines()
    assert [p.split(": ")[1] for p in problems] == ["gateway.api_keys", "models[0].api_key"]


def test_invalid_yaml_names_the_line_but_not_its_text(tmp_path: Path) -> None:
    path = write(tmp_path, f'gateway:\n  api_keys: ["{SECRET}"\nmodels: []\n')
    message = load_error(path)  # the line holds a key: quoting it would leak the key
    assert message.startswith(f"{path}: not valid YAML")
    assert "line 3" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- gateway\n- models\n")
    assert load_error(path) == (
        f"{path}: expected a mapping with `gateway:` and `models:` at the top"
    )


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert load_error(missing).startswith(f"{missing}: cannot read")


def test_example_cpu_demo_loads_and_plans(tmp_path: Path) -> None:
    example = REPO / "deploy" / "examples" / "cpu-demo.yaml"
    environ = {
        "ENGINEGATE_API_KEY": SECRET,
        "ENGINEGATE_ADMIN_KEY": "sk-admin-example",
        "SMOLLM2_MODEL": "/models/smollm2",
        "ENGINE_PYTHON": "/opt/engine/bin/python",
        "ENGINEGATE_STATE_DIR": str(tmp_path),
    }
    config = load_config(example, environ)
    assert isinstance(config, Config)
    assert config.gateway.api_keys == [SECRET]
    assert config.gateway.port == 8000
    assert config.gateway.state_dir == tmp_path
    (smollm2,) = config.models
    assert (smollm2.name, smollm2.backend, smollm2.device) == ("smollm2", "vllm", "cpu")
    assert smollm2.model == "/models/smollm2"
    assert smollm2.command == [
        "/opt/engine/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]

    (slot,) = plan_workers(config, str(example), gpu_count=0, cpu_cores=[0, 1])
    assert (slot.worker_id, slot.gpus, slot.cpu_ranks) == ("smollm2-0", (), ("0-1",))


def test_env_may_not_set_the_worker_secret_or_its_devices(tmp_path):
    for key in ("VLLM_API_KEY", "CUDA_VISIBLE_DEVICES"):
        path = tmp_path / "enginegate.yaml"
        model = {"name": "m", "backend": "vllm", "model": "/m", "env": {key: "x"}}
        path.write_text(json.dumps({"gateway": {"api_keys": ["k"]}, "models": [model]}))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert f"models[0].env: {key}: set by enginegate itself" in str(err.value)


def test_variables_read_into_secrets_are_named_for_hiding_from_engines(tmp_path: Path) -> None:
    """Finding 13: the config knows which environment variables hold the gateway's secrets
    (API, admin and upstream keys, the metrics token), so engines can be started without them;
    a variable read for anything else stays."""
    path = write(
        tmp_path,
        """\
        gateway:
          port: ${PORT}
          api_keys: ["${USER_KEY}", "literal-key"]
          admin_keys: ["${ADMIN_KEY}"]
          metrics_token: ${METRICS:-}
        models:
          - {name: far, backend: external, url: "http://h:1/v1", api_key: "${UPSTREAM_KEY}"}
          - {name: near, backend: vllm, model: "${MODEL_DIR}", device: cpu}
        """,
    )
    environ = {"PORT": "8001", "USER_KEY": "u", "ADMIN_KEY": "a", "UPSTREAM_KEY": "x"}
    config = load_config(path, {**environ, "MODEL_DIR": "/m"})
    assert config.secret_env == {"USER_KEY", "ADMIN_KEY", "METRICS", "UPSTREAM_KEY"}
