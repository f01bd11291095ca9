"""What one configured model asks for: the `models:` entries of enginegate.yaml.

The gateway's config file embeds these; the supervisor and the adapters read them. Checks that
need only one entry live here; checks across entries (names, GPU overlap) live in placement.
"""

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backends.reasoning import Reasoning

Backend = Literal["vllm", "sglang", "lmdeploy", "external"]
Device = Literal["cuda", "cpu"]
EngineArg = str | int | float | bool | None

# Flags enginegate sets itself on every engine; a user value would break routing or security.
MANAGED_ENV = frozenset({"VLLM_API_KEY", "CUDA_VISIBLE_DEVICES"})
MANAGED_ARGS = frozenset(
    {
        "model",
        "model-path",
        "served-model-name",
        "model-name",
        "host",
        "port",
        "server-name",
        "server-port",
        "api-key",
        "api-keys",
        "tensor-parallel-size",
        "tp",
        "tp-size",
        "pipeline-parallel-size",
        "pp",
        "pp-size",
        "nccl-port",
    }
)
# Engine flags that have a key of their own in the spec, and what to write instead.
MOVED_ARGS = {
    "reasoning-parser": "use the model's `reasoning:` key (one spelling for every engine)",
    "backend": "use `lmdeploy_backend:`",
    **dict.fromkeys(
        ("nnodes", "node-rank", "dist-init-addr", "nccl-init-addr", "master-addr", "master-port"),
        "multi-node is not supported yet as an engine flag; use the model's `nodes:` key",
    ),
}
MULTI_NODE = (
    "multi-node is not supported yet as this key; use `nodes: N` (the number of hosts), which "
    "`enginegate render k8s` writes as a LeaderWorkerSet"
)
# Engines whose own multi-node launch enginegate knows (backends/multinode.py).
MULTI_NODE_BACKENDS = ("vllm", "sglang")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[^\s:]+$", description="what clients send as model")
    aliases: list[Annotated[str, Field(min_length=1, pattern=r"^[^\s:]+$")]] = Field(
        default_factory=list, description="other names clients may send for this model"
    )
    backend: Backend
    model: str | None = Field(None, description="path or hub id the engine loads")
    device: Device = "cuda"
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")
    replicas: int = Field(1, ge=1)
    gpus: list[int] | None = Field(None, description="GPU indices; tp*pp*replicas of them")
    reasoning: Reasoning | None = Field(
        None, description="reasoning parser; each engine gets its own spelling of it"
    )
    lmdeploy_backend: Literal["turbomind", "pytorch"] | None = Field(
        None, description="LMDeploy only; none: LMDeploy's default (turbomind, else pytorch)"
    )
    config_json: str | None = Field(
        None, description="the model's config.json, for `enginegate plan` when model is a hub id"
    )
    nodes: int = Field(
        1, ge=1, description="hosts one replica spans; tp*pp GPUs are split evenly over them"
    )
    # accepted so that a multi-node config fails with a clear message, not "unknown key"
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    dist_init_addr: str | None = None
    engine_args: dict[str, EngineArg] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    command: list[str] | None = Field(None, min_length=1, description="argv that starts the engine")
    startup_timeout: float = Field(900, gt=0, description="seconds from start to ready")
    kv_cache_gib: float = Field(1, gt=0, description="CPU only: VLLM_CPU_KVCACHE_SPACE")
    # admission (the gateway enforces these; engines queue on their own beyond them)
    max_in_flight: int | None = Field(None, ge=1, description="requests at once; none: no limit")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond max_in_flight")
    queue_timeout: float = Field(30, gt=0, description="seconds a request may wait in line")
    # routing across replicas (the gateway's policies; see gateway/routing/)
    routing: Literal["least_outstanding", "prefix_affinity"] = "least_outstanding"
    prefix_chars: int = Field(512, ge=16, description="prefix affinity: characters keyed on")
    # models on demand (the gateway starts and stops them; see gateway/on_demand.py)
    start: Literal["always", "on_demand"] = Field(
        "always", description="on_demand: start at the first request for it, stop when idle"
    )
    idle_stop: float | None = Field(
        None, gt=0, description="on_demand: stop after this long without requests (600, 10m)"
    )
    exclusive: str | None = Field(
        None, min_length=1, description="on_demand models of one group run one at a time"
    )
    idle_action: Literal["stop", "sleep"] = Field(
        "stop", description="sleep: vLLM's sleep mode on GPU (--enable-sleep-mode) instead"
    )
    # external backend only
    url: str | None = Field(None, pattern=r"^https?://", description="OpenAI base URL, e.g. .../v1")
    api_key: str | None = None
    upstream_model: str | None = Field(None, description="model name the upstream expects")

    @property
    def ranks(self) -> int:
        """Devices one replica holds."""
        return self.tp * self.pp

    @property
    def runs_here(self) -> bool:
        """An engine enginegate starts on this host; `external` is someone else's server."""
        return self.backend != "external"

    @property
    def needs_gpus(self) -> bool:
        return self.runs_here and self.device == "cuda"

    @property
    def needs_cpu_cores(self) -> bool:
        return self.runs_here and self.device == "cpu"

    @field_validator("idle_stop", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        """`90`, `90s`, `10m` or `1h` → seconds."""
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value)
            if match is None:
                raise ValueError("expected seconds or a duration such as 90s, 10m, 1h")
            return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
        return value

    @field_validator("engine_args")
    @classmethod
    def _check_engine_args(cls, args: dict[str, EngineArg]) -> dict[str, EngineArg]:
        """Accept `max_model_len`, `--max-model-len` or `max-model-len`; keep the last form."""
        normalised = {key.lstrip("-").replace("_", "-"): value for key, value in args.items()}
        managed = sorted(MANAGED_ARGS.intersection(normalised))
        if managed:
            raise ValueError(
                f"{', '.join(managed)}: set by enginegate itself; remove from engine_args"
            )
        moved = sorted(MOVED_ARGS.keys() & normalised.keys())
        if moved:
            raise ValueError("; ".join(f"{key}: {MOVED_ARGS[key]}" for key in moved))
        return normalised

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        """The worker's secret and its devices come from enginegate; a user value breaks both."""
        managed = sorted(MANAGED_ENV.intersection(env))
        if managed:
            raise ValueError(
                f"{', '.join(managed)}: set by enginegate itself (use gpus: for devices); "
                "remove from env"
            )
        return env

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str, info: ValidationInfo) -> str:
        backend = info.data.get("backend")
        if device == "cpu" and backend in ("sglang", "lmdeploy"):
            raise ValueError(f"{backend} workers need GPUs; only vllm runs on the CPU here")
        return device

    @field_validator("pp")
    @classmethod
    def _check_pp(cls, pp: int, info: ValidationInfo) -> int:
        # lmdeploy 0.18 `serve api_server` has no pipeline-parallel flag (cli/serve.py).
        if pp > 1 and info.data.get("backend") == "lmdeploy":
            raise ValueError("LMDeploy has no pipeline parallelism; use tp, or vllm/sglang")
        return pp

    @field_validator("lmdeploy_backend")
    @classmethod
    def _check_lmdeploy_backend(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("backend") != "lmdeploy":
            raise ValueError("is for backend 'lmdeploy' only")
        return value

    @field_validator("nnodes", "node_rank", "dist_init_addr")
    @classmethod
    def _single_node(cls, value: int | str | None, info: ValidationInfo) -> int | str | None:
        default = {"nnodes": 1, "node_rank": 0, "dist_init_addr": None}[str(info.field_name)]
        if value != default:
            raise ValueError(MULTI_NODE)
        return value

    @property
    def ranks_per_node(self) -> int:
        """Devices one replica holds on each of its hosts."""
        return self.ranks // self.nodes

    @model_validator(mode="after")
    def _check_nodes(self) -> "ModelSpec":
        if self.nodes == 1:
            return self
        if self.backend not in MULTI_NODE_BACKENDS:
            raise ValueError(
                f"nodes: {self.nodes}: backend {self.backend!r} has no multi-node launch here; "
                f"supported: {', '.join(MULTI_NODE_BACKENDS)}"
            )
        if self.ranks % self.nodes:
            raise ValueError(
                f"nodes: {self.nodes} does not divide tp*pp = {self.ranks}: every host holds "
                "the same number of GPUs"
            )
        if self.gpus is not None:
            raise ValueError("gpus: lists one host's GPUs; a multi-node model gets them per host")
        return self

    @model_validator(mode="after")
    def _check_on_demand(self) -> "ModelSpec":
        if self.start == "always":
            for key in ("idle_stop", "exclusive"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is for `start: on_demand` models")
            if self.idle_action != "stop":
                raise ValueError("idle_action is for `start: on_demand` models")
        elif self.backend == "external":
            raise ValueError("an external backend runs elsewhere: it cannot start on demand")
        if self.idle_action == "sleep" and (self.backend != "vllm" or self.device != "cuda"):
            raise ValueError(
                "idle_action: sleep needs vLLM on GPU (its sleep mode frees GPU memory; "
                "the CPU build has none): use idle_action: stop"
            )
        return self

    @model_validator(mode="after")
    def _check_backend_fields(self) -> "ModelSpec":
        if self.backend == "external":
            if not self.url:
                raise ValueError("backend 'external' needs url (the upstream's OpenAI base URL)")
            if self.model or self.command or self.gpus:
                raise ValueError("backend 'external' takes url/api_key, not model/command/gpus")
        else:
            if not self.model:
                raise ValueError(f"backend {self.backend!r} needs model (a path or hub id)")
            if self.url:
                raise ValueError("url is for backend 'external'; engines are started locally")
        if self.gpus is not None:
            if self.device == "cpu":
                raise ValueError("gpus is set but device is 'cpu'")
            want = self.ranks * self.replicas
            if len(self.gpus) != want:
                raise ValueError(
                    f"gpus has {len(self.gpus)} entries, expected tp*pp*replicas = {want}"
                )
            if len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"gpus lists a GPU twice: {self.gpus}")
        return self
