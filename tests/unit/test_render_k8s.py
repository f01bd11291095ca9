"""`enginegate render k8s`: manifests that Kubernetes and the LeaderWorkerSet CRD accept.

Schemas (no cluster, no network): the Kubernetes 1.37 strict schemas that the
kubernetes-validate package ships (the openapi2jsonschema schemas kubeconform uses), and the
LeaderWorkerSet v1 CRD of kubernetes-sigs/lws v0.10.0 made strict the way kubeconform does
(tests/unit/data/k8s/crd_schema.py).
"""

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.spec import ModelSpec
from gateway.cli import main
from gateway.config import ConfigError, load_config
from gateway.render import render

EXAMPLE = Path(__file__).parents[2] / "deploy" / "examples" / "k8s-two-node.yaml"
LWS_SCHEMA = Path(__file__).parent / "data" / "k8s" / "leaderworkerset-leaderworkerset-v1.json"
KUBERNETES = "1.37"
SECRET_VALUES = {
    "ENGINEGATE_API_KEY": "sk-gw-Zr41",
    "ENGINEGATE_ADMIN_KEY": "sk-admin-Lp02",
    "HF_TOKEN": "hf_Qx93",
    "UPSTREAM_API_KEY": "up-77",
}


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_VALUES.items():
        monkeypatch.setenv(name, value)


def rendered(file: Path = EXAMPLE) -> dict[str, list[dict[str, Any]]]:
    files, _ = render(str(file), "enginegate:test", _images(), "enginegate")
    return files


def _images() -> dict[str, str]:
    return {"vllm": "vllm:t", "sglang": "sglang:t", "lmdeploy": "lmdeploy:t"}


def validate(manifest: dict[str, Any]) -> None:
    """Raise when the manifest breaks its schema (strict: unknown fields are errors)."""
    if manifest["kind"] == "LeaderWorkerSet":
        schema = json.loads(LWS_SCHEMA.read_text())
        jsonschema.Draft7Validator(schema).validate(manifest)
    else:
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def by_kind(files: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    return next(
        m
        for ms in files.values()
        for m in ms
        if m["kind"] == kind and m["metadata"]["name"] == name
    )


def test_every_manifest_validates_against_kubernetes_and_the_lws_crd() -> None:
    files = rendered()
    kinds = sorted({m["kind"] for ms in files.values() for m in ms})
    assert kinds == [
        "ConfigMap", "Deployment", "LeaderWorkerSet", "NetworkPolicy", "Service"
    ]  # fmt: skip
    for manifests in files.values():
        for manifest in manifests:
            validate(manifest)


@pytest.mark.parametrize(
    ("kind", "name", "path", "bad"),
    [
        (
            "LeaderWorkerSet",
            "deepseek-r1",
            ("spec", "leaderWorkerTemplate", "restartPolicy"),
            "Always",
        ),
        ("LeaderWorkerSet", "deepseek-r1", ("spec", "leaderWorkerTemplate", "sizee"), 2),
        ("Deployment", "qwen3-8b", ("spec", "template", "spec", "containers", 0, "commands"), []),
        ("Deployment", "enginegate", ("spec", "replicas"), "one"),
    ],
)
def test_the_schemas_refuse_a_broken_manifest(
    kind: str, name: str, path: tuple[Any, ...], bad: Any
) -> None:
    """The check above can fail: a wrong enum, an unknown field, a wrong type are caught."""
    manifest = by_kind(rendered(), kind, name)
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(manifest)


def test_a_multi_node_model_is_a_group_restarted_as_a_whole() -> None:
    lws = by_kind(rendered(), "LeaderWorkerSet", "deepseek-r1")
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == 8  # tp 16 over 2 hosts
    assert leader["command"][-6:] == [
        "--nnodes", "2", "--node-rank", "0", "--dist-init-addr", "$(LWS_LEADER_ADDRESS):29501"
    ]  # fmt: skip
    assert worker["command"][-6:] == [
        "--nnodes", "2", "--node-rank", "$(LWS_WORKER_INDEX)",
        "--dist-init-addr", "$(LWS_LEADER_ADDRESS):29501",
    ]  # fmt: skip
    assert "readinessProbe" in leader and "readinessProbe" not in worker
    service = by_kind(rendered(), "Service", "deepseek-r1")
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"


def test_vllm_followers_are_headless() -> None:
    template = by_kind(rendered(), "LeaderWorkerSet", "deepseek-r1-vllm")["spec"]
    leader = template["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    worker = template["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert "--headless" not in leader["command"]
    assert worker["command"][-1] == "--headless"
    assert (
        leader["command"][leader["command"].index("--master-addr") + 1] == "$(LWS_LEADER_ADDRESS)"
    )
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == 8  # tp 8 x pp 2 over 2 hosts


def test_a_single_node_replica_runs_the_adapters_exact_argv() -> None:
    deployment = by_kind(rendered(), "Deployment", "qwen3-8b")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    spec = load_config(EXAMPLE).models[2]
    launch = ADAPTERS["vllm"].launch(
        Slot("qwen3-8b-0", spec, 0), 8000, "$(ENGINEGATE_ENGINE_KEY)", host="$(POD_IP)"
    )
    assert container["command"] == launch.argv
    assert deployment["spec"]["replicas"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = {e["name"]: e for e in container["env"]}
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin's to set
    assert env["VLLM_API_KEY"]["value"] == "$(ENGINEGATE_ENGINE_KEY)"
    assert [e["name"] for e in container["env"]][:2] == ["ENGINEGATE_ENGINE_KEY", "POD_IP"]


def test_no_secret_is_written_and_every_named_variable_is_read_from_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["render", "k8s", "-c", str(EXAMPLE), "-o", str(tmp_path / "out")])
    assert exited.value.code == 0
    written = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert sorted(written) == [
        "deepseek-r1-vllm.yaml", "deepseek-r1.yaml", "enginegate.yaml", "qwen3-8b.yaml"
    ]  # fmt: skip
    for value in SECRET_VALUES.values():
        assert all(value not in text for text in written.values())
    out = capsys.readouterr().out
    for name in [*SECRET_VALUES, "ENGINEGATE_ENGINE_KEY", "ENGINEGATE_METRICS_TOKEN"]:
        assert f"--from-literal={name}=..." in out
    files = rendered()
    gateway_env = by_kind(files, "Deployment", "enginegate")["spec"]["template"]["spec"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway_env["containers"][0]["env"]}
    assert refs["ENGINEGATE_METRICS_TOKEN"]["optional"] is True  # ${ENGINEGATE_METRICS_TOKEN:-}
    assert refs["ENGINEGATE_ADMIN_KEY"]["optional"] is False
    assert refs["UPSTREAM_API_KEY"]["optional"] is False
    leader = by_kind(files, "LeaderWorkerSet", "deepseek-r1")["spec"]["leaderWorkerTemplate"]
    env = {e["name"]: e for e in leader["leaderTemplate"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"


def test_the_gateway_pod_config_loads_and_points_at_each_engine_service(tmp_path: Path) -> None:
    config_map = by_kind(rendered(), "ConfigMap", "enginegate-config")
    path = tmp_path / "enginegate.yaml"
    path.write_text(config_map["data"]["enginegate.yaml"])
    environ = {name: f"x-{name}" for name in [*SECRET_VALUES, "ENGINEGATE_ENGINE_KEY"]}
    config = load_config(path, environ)
    assert config.gateway.host == "0.0.0.0"
    urls = {m.name: (m.backend, m.url) for m in config.models}
    assert urls["deepseek-r1"] == ("external", "http://deepseek-r1:8000/v1")
    assert urls["gpt-outside"] == ("external", "https://api.example.com/v1")
    assert config.models[2].max_in_flight == 64  # admission stays the gateway's
    assert "ENGINEGATE_ENGINE_KEY" in config.secret_env


def test_names_that_are_not_dns_labels_get_a_stable_hash(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "gateway: {allow_unauthenticated: true}\nmodels:\n"
        "  - {name: Org/Model_A, backend: vllm, model: /m}\n"
    )
    (name,) = [n for n in rendered(path) if n != "enginegate.yaml"]
    assert name.startswith("org-model-a-") and len(name) == len("org-model-a-") + 6 + 5


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{backend: lmdeploy, model: /m, tp: 2, nodes: 2}", "backend 'lmdeploy' has no multi-node"),
        ("{backend: vllm, model: /m, tp: 3, nodes: 2}", "nodes: 2 does not divide tp*pp = 3"),
        ("{backend: vllm, model: /m, tp: 2, nodes: 2, gpus: [0, 1]}", "gpus: lists one host's"),
        (
            "{backend: vllm, model: /m, env: {T: 'a${HF_TOKEN}'}}",
            "models[0].env.T: write the whole",
        ),
        ("{backend: vllm, model: '${MODEL_DIR}/x'}", "models[0]: MODEL_DIR not set"),
    ],
)
def test_refusals_name_the_key(tmp_path: Path, entry: str, problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("gateway: {allow_unauthenticated: true}\nmodels:\n  - {name: m, " + entry[1:])
    with pytest.raises(ConfigError) as refused:
        render(str(path), "g", _images(), "s")
    assert problem in str(refused.value)
    assert str(path) in str(refused.value)


def test_serve_and_check_refuse_a_multi_node_model_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["check", "-c", str(EXAMPLE), "--only", "deepseek-r1"])
    assert "models[0].nodes: 2 hosts" in str(exited.value.code)
    assert "enginegate render k8s" in str(exited.value.code)


def test_node_flags_refuse_an_engine_without_a_multi_node_launch() -> None:
    from backends.multinode import node_flags

    spec = ModelSpec(name="m", backend="lmdeploy", model="/m", tp=2)
    with pytest.raises(ValueError, match="lmdeploy has no multi-node launch"):
        node_flags(spec, "0", "h")
