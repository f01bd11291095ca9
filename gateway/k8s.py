"""Kubernetes manifests for a config: the gateway, and every engine model beside it.

What each part becomes:
- the gateway: a ConfigMap with a derived enginegate.yaml (each engine model turned into an
  `external` entry that points at its Service), a Deployment and a Service;
- a model with `nodes: 1`: a Deployment with `replicas:` pods, each holding tp*pp GPUs;
- a model with `nodes: N`: a LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) of `replicas:`
  groups of N pods, recreated as a whole when any pod restarts (a surviving rank of a broken
  engine hangs or keeps answering /health: multinode-2026-12.md §1.0);
- every engine model: a Service for the pods that serve HTTP and a NetworkPolicy that lets in
  only the gateway (and, for a group, the group's own pods).

Secrets are never written out: every variable the config names is read from one Secret the
user creates, and the engines' shared key (`ENGINE_KEY`) too; argv and env refer to it as
`$(ENGINEGATE_ENGINE_KEY)`, which the kubelet expands. Engine argv is the adapters' own, with
`host` set to the pod's IP instead of loopback or a Unix socket.
"""

import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.multinode import node_flags
from backends.placement import worker_id
from backends.spec import ModelSpec
from gateway.config import Config

Manifest = dict[str, Any]

ENGINE_KEY = "ENGINEGATE_ENGINE_KEY"
ENGINE_PORT = 8000
CONFIG_DIR = "/etc/enginegate"
STATE_DIR = "/var/lib/enginegate"
PROBE_PERIOD = 10
GPU = "nvidia.com/gpu"
PART_OF = {"app.kubernetes.io/part-of": "enginegate"}
GATEWAY_LABELS = {**PART_OF, "app.kubernetes.io/component": "gateway"}
# LWS labels every pod with its index in the group; the leader is 0 (lws api/leaderworkerset).
LWS_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
DEFAULT_ENGINE_IMAGES = {
    "vllm": "vllm/vllm-openai:v0.26.0",
    "sglang": "lmsysorg/sglang:v0.5.17",
    "lmdeploy": "openmmlab/lmdeploy:v0.18.0",
}
# The keys of a model entry the gateway itself acts on; the rest is the engine's.
GATEWAY_KEYS = (
    "name",
    "aliases",
    "max_in_flight",
    "max_queue",
    "queue_timeout",
    "routing",
    "prefix_chars",
)
_NOT_IN_NAMES = re.compile(r"[^a-z0-9-]+")


class _Dumper(yaml.SafeDumper):
    """No `&id001` anchors (a reader follows plain YAML better); text blocks as `|`."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None
    )


_Dumper.add_representer(str, _text)


def dump(manifests: list[Manifest]) -> str:
    """A multi-document YAML stream, as `kubectl apply -f` reads it."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False)


def k8s_name(name: str) -> str:
    """A DNS-1035 label (Services need one): `deepseek-ai/DeepSeek-R1` → `deepseek-ai-deepseek-r1`.
    A name that had to change, or was too long, gets a hash of the original, so two model
    names never meet in one object name."""
    label = _NOT_IN_NAMES.sub("-", name.lower()).strip("-")
    label = re.sub(r"^[0-9-]+", "", label) or "model"
    if label == name and len(label) <= 40:
        return label
    return f"{label[:40].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def model_labels(spec: ModelSpec) -> dict[str, str]:
    return {**PART_OF, "app.kubernetes.io/component": "engine", "enginegate/model": _label(spec)}


def _label(spec: ModelSpec) -> str:
    return k8s_name(spec.name)


def gateway_config(config: Config, raw: dict[str, Any]) -> dict[str, Any]:
    """The config the gateway pod runs: the file as written (its `${VAR}`s unexpanded), bound
    to all addresses, and each engine model replaced by an external entry for its Service."""
    models = []
    for spec, entry in zip(config.models, raw["models"], strict=True):
        if not spec.runs_here:
            models.append(entry)
            continue
        kept = {key: entry[key] for key in GATEWAY_KEYS if key in entry}
        models.append(
            kept
            | {
                "backend": "external",
                "url": f"http://{_label(spec)}:{ENGINE_PORT}/v1",
                "api_key": f"${{{ENGINE_KEY}}}",
                "upstream_model": spec.name,
            }
        )
    gateway = {**raw["gateway"], "host": "0.0.0.0", "state_dir": STATE_DIR}
    return {**raw, "gateway": gateway, "models": models}


def gateway_manifests(
    config: Config, derived: dict[str, Any], variables: dict[str, bool], image: str, secret: str
) -> list[Manifest]:
    """ConfigMap, Deployment and Service of the gateway. `variables`: name → has a default."""
    text = yaml.safe_dump(derived, sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    g = config.gateway
    env = [_from_secret(name, secret, optional) for name, optional in sorted(variables.items())]
    container = {
        "name": "gateway",
        "image": image,
        "args": ["serve", "-c", f"{CONFIG_DIR}/enginegate.yaml"],
        "ports": [{"name": "http", "containerPort": g.port}],
        "env": env,
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
        ],
    }
    pod = {
        "metadata": {"labels": GATEWAY_LABELS, "annotations": {"enginegate/config": digest}},
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "config", "configMap": {"name": "enginegate-config"}},
                {"name": "state", "emptyDir": {}},
            ],
            # the drain, then what the engines-as-externals need: nothing
            "terminationGracePeriodSeconds": int(g.drain_timeout) + 5,
        },
    }
    return [
        _object("v1", "ConfigMap", "enginegate-config", PART_OF, data={"enginegate.yaml": text}),
        _deployment("enginegate", GATEWAY_LABELS, 1, pod),
        _service("enginegate", GATEWAY_LABELS, GATEWAY_LABELS, g.port),
    ]


def engine_manifests(
    spec: ModelSpec, image: str, secret: str, env_from: dict[str, str]
) -> list[Manifest]:
    """The Deployment or LeaderWorkerSet of one engine model, its Service and NetworkPolicy.
    `env_from`: the model's `env:` entries read from the Secret (entry → variable)."""
    name, labels = _label(spec), model_labels(spec)
    pod = Pod(spec, image, secret, env_from)
    if spec.nodes == 1:
        workload = _deployment(name, labels, spec.replicas, pod.build(None))
        serving = labels
    else:
        workload = _leader_worker_set(spec, name, labels, pod)
        serving = {**labels, LWS_INDEX: "0"}
    return [
        workload,
        _service(name, labels, serving, ENGINE_PORT),
        _network_policy(name, labels, spec.nodes > 1),
    ]


def _leader_worker_set(spec: ModelSpec, name: str, labels: dict[str, str], pod: "Pod") -> Manifest:
    # LWS sets LWS_LEADER_ADDRESS and LWS_WORKER_INDEX in every container; the kubelet
    # expands $(VAR) in command and args.
    leader_address = "$(LWS_LEADER_ADDRESS)"
    leader = pod.build(node_flags(spec, "0", leader_address))
    worker = pod.build(node_flags(spec, "$(LWS_WORKER_INDEX)", leader_address))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Followers serve no API (vLLM --headless) or one that proves nothing (SGLang):
        # a follower is alive while its process is, and any restart recreates the group.
        worker["spec"]["containers"][0].pop(probe)
    spec_ = {
        "replicas": spec.replicas,
        "startupPolicy": "LeaderCreated",
        "leaderWorkerTemplate": {
            "size": spec.nodes,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": leader,
            "workerTemplate": worker,
        },
    }
    return _object("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", name, labels, spec=spec_)


class Pod:
    """One engine model's pod template: the adapter's argv, the key from the Secret."""

    def __init__(self, spec: ModelSpec, image: str, secret: str, env_from: dict[str, str]):
        self.spec = spec
        self.image = image
        self.secret = secret
        self.env_from = env_from

    def build(self, extra: list[str] | None) -> Manifest:
        """The template, with `extra` flags after the adapter's argv."""
        spec = self.spec
        adapter = ADAPTERS[spec.backend]
        slot = Slot(worker_id(spec.name, 0), spec, 0)
        # Side ports are the pod's own: no other engine shares its network namespace.
        side = tuple(ENGINE_PORT + 1 + i for i in range(adapter.side_ports(spec)))
        launch = adapter.launch(slot, ENGINE_PORT, f"$({ENGINE_KEY})", side, host="$(POD_IP)")
        # Order matters: $(VAR) expands only to variables listed before it.
        env = [
            _from_secret(ENGINE_KEY, self.secret, False),
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ]
        for key, value in launch.env.items():
            if key == "CUDA_VISIBLE_DEVICES" and spec.device == "cuda":
                continue  # the device plugin sets the visible GPUs; a CPU engine keeps none
            if key in self.env_from:
                env.append({**_from_secret(self.env_from[key], self.secret, False), "name": key})
            else:
                env.append({"name": key, "value": value})
        health = urlsplit(launch.health_url or "").path or "/health"
        timeout = int(launch.health_timeout or 5)
        probe = {"httpGet": {"path": health, "port": "http"}, "timeoutSeconds": timeout}
        container: Manifest = {
            "name": "engine",
            "image": self.image,
            "command": [*launch.argv, *(extra or [])],
            "env": env,
            "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
            "startupProbe": {
                **probe,
                "periodSeconds": PROBE_PERIOD,
                "failureThreshold": max(1, -(-int(spec.startup_timeout) // PROBE_PERIOD)),
            },
            "readinessProbe": {**probe, "periodSeconds": 5},
            "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 3},
        }
        volumes = []
        if spec.device == "cuda":
            container["resources"] = {"limits": {GPU: spec.ranks_per_node}}
            # NCCL and the engines' worker processes share tensors through /dev/shm, which
            # Kubernetes caps at 64 MiB unless a memory volume is mounted there.
            container["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}]
            volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        pod_spec: Manifest = {"containers": [container]}
        if volumes:
            pod_spec["volumes"] = volumes
        return {"metadata": {"labels": model_labels(spec)}, "spec": pod_spec}


def _from_secret(name: str, secret: str, optional: bool) -> Manifest:
    ref = {"name": secret, "key": name, "optional": optional}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _object(api: str, kind: str, name: str, labels: dict[str, str], **rest: Any) -> Manifest:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "labels": labels}, **rest}


def _deployment(name: str, labels: dict[str, str], replicas: int, pod: Manifest) -> Manifest:
    spec = {"replicas": replicas, "selector": {"matchLabels": labels}, "template": pod}
    return _object("apps/v1", "Deployment", name, labels, spec=spec)


def _service(name: str, labels: dict[str, str], selector: dict[str, str], port: int) -> Manifest:
    ports = [{"name": "http", "port": port, "targetPort": "http"}]
    return _object("v1", "Service", name, labels, spec={"selector": selector, "ports": ports})


def _network_policy(name: str, labels: dict[str, str], is_group: bool) -> Manifest:
    """Only the gateway reaches an engine: vLLM's key guards only /v1 and a few other paths
    (backends/vllm.py). A group's pods also reach each other, on any port (NCCL opens its own)."""
    ingress: list[Manifest] = [
        {
            "from": [{"podSelector": {"matchLabels": GATEWAY_LABELS}}],
            "ports": [{"port": ENGINE_PORT, "protocol": "TCP"}],
        }
    ]
    if is_group:
        ingress.append({"from": [{"podSelector": {"matchLabels": labels}}]})
    spec = {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"], "ingress": ingress}
    return _object("networking.k8s.io/v1", "NetworkPolicy", name, labels, spec=spec)
