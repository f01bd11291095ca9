"""What an engine adapter receives and returns, and what it knows about its engine.

An adapter is pure: a `Slot` (one replica's model spec, devices), where to listen (a loopback
port, or a Unix socket path for an engine that `listens_on_socket`) and a secret go in, a
`Launch` (argv, env, where to probe and scrape) comes out. Starting and watching the process
is the supervisor's job, so adapters are unit-tested by comparing argv lists. Every fact that
differs between engines (flag spellings, memory rule, endpoints) lives in its adapter, so a new
engine is one adapter module and its tests.
"""

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from backends.memory import Budget, Estimate
from backends.spec import EngineArg, ModelSpec

# The APIs beyond chat completions, completions and embeddings (which every engine is sent)
# that an engine may serve itself; gateway/engine_api.py routes each to the engines that have it.
#   responses         POST /v1/responses
#   stored_responses  GET /v1/responses/{id}, POST /v1/responses/{id}/cancel, previous_response_id
#   messages          POST /v1/messages and /v1/messages/count_tokens (Anthropic's)
#   rerank, score     POST /v1/rerank, /v1/score
#   tokenize          POST /tokenize, /detokenize
ENGINE_APIS = frozenset(
    ("responses", "stored_responses", "messages", "rerank", "score", "tokenize")
)

# Variables that would make engines on one host share ports or join a foreign cluster.
UNSAFE_ENV = ("VLLM_PORT", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS", "VLLM_API_KEY")


@dataclass(frozen=True)
class Slot:
    """One replica's place: which model, which devices. Computed by placement."""

    worker_id: str
    model: ModelSpec
    replica: int
    gpus: tuple[int, ...] = ()
    cpu_ranks: tuple[str, ...] = ()  # one core list per rank, e.g. ("0", "1") or ("0-3",)


def worker_secret() -> str:
    """A fresh per-start worker key. Hex, so it never starts with `-`: SGLang and LMDeploy
    take it as `--api-key KEY`, and argparse refuses a value that looks like a flag (about one
    start in 64 with url-safe base64)."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class Launch:
    """How to run one worker and how to tell that it is ready."""

    argv: list[str]
    env: dict[str, str]  # set on top of the gateway's environment, minus UNSAFE_ENV
    base_url: str  # OpenAI base URL, ends in /v1
    health_url: str | None  # None: no liveness endpoint, readiness is /models alone
    served_name: str  # the model id the engine expects in requests
    api_key: str | None = None
    remove_env: tuple[str, ...] = field(default=UNSAFE_ENV)
    metrics_url: str | None = None  # the engine's Prometheus page; None: not ours to scrape
    # The Unix socket the engine serves HTTP on; the URLs above then say only the path (their
    # host means nothing). None: TCP, to the URLs' host and port.
    socket_path: str | None = None
    # The least time one probe may take: an engine whose health URL runs a generation needs
    # longer than the supervisor's default. None: the supervisor's.
    health_timeout: float | None = None

    @property
    def has_process(self) -> bool:
        return bool(self.argv)


class Adapter(Protocol):
    """One engine: how to start it, and the facts about it that the rest of enginegate asks."""

    @property
    def has_process(self) -> bool:
        """False for a server someone else runs: no process, port, devices or metrics."""
        ...

    @property
    def releases(self) -> str:
        """The engine releases whose flags, routes and probe this adapter was checked
        against (`enginegate check` prints it)."""
        ...

    @property
    def apis(self) -> frozenset[str]:
        """The ENGINE_APIS the engine serves itself, read in its own route table."""
        ...

    @property
    def listens_on_socket(self) -> bool:
        """True: the engine serves HTTP on the Unix socket `launch` is given, and needs no
        TCP port; its URLs are reached through that socket."""
        ...

    @property
    def devices(self) -> tuple[str, ...]:
        """The `device:` values the engine runs on ("cuda", "cpu")."""
        ...

    @property
    def pipeline_parallel(self) -> bool:
        """Whether the engine takes `pp > 1`."""
        ...

    @property
    def context_flag(self) -> str | None:
        """The engine arg that sets the context length, e.g. `max-model-len`."""
        ...

    @property
    def reasoning_parsers(self) -> Mapping[str, str]:
        """enginegate's `reasoning:` spelling -> the engine's `--reasoning-parser` value."""
        ...

    def side_ports(self, spec: ModelSpec) -> int:
        """How many loopback ports besides the HTTP one the engine binds (NCCL store, ...).

        The supervisor allocates them with the HTTP port, so engines on one host never pick
        the same one; an engine left to choose its own picks at random and may collide.
        """
        ...

    def launch(
        self,
        slot: Slot,
        port: int,
        api_key: str,
        side_ports: tuple[int, ...] = (),
        socket_path: str | None = None,
        host: str | None = None,
    ) -> Launch:
        """`port` for an engine on TCP, `socket_path` for one that `listens_on_socket` (which
        raises ValueError without it, unless `host` is given); each ignores the other.

        `host`: bind that address and `port` instead of loopback or the socket, for an engine
        that the gateway reaches over a network (a Kubernetes pod); None: this host only."""
        ...

    def memory_budget(
        self, need: Estimate, total: int, free: int, spec: ModelSpec
    ) -> Budget | None:
        """What the engine takes of each GPU (`total` and `free` bytes, the tightest of the
        replica's) by its own rule and flags; None when it has no rule (nothing runs here)."""
        ...


def local_launch(
    argv: list[str],
    env: dict[str, str],
    spec: ModelSpec,
    port: int,
    api_key: str,
    health: str,
    metrics: str = "/metrics",
    socket_path: str | None = None,
    health_timeout: float | None = None,
    host: str | None = None,
) -> Launch:
    """The Launch of an engine: loopback URLs (or URLs through `socket_path`, or to `host`),
    the spec's env applied last."""
    base = "http://localhost" if socket_path else f"http://{host or '127.0.0.1'}:{port}"
    return Launch(
        argv=argv,
        env={**env, **spec.env},
        base_url=f"{base}/v1",
        health_url=f"{base}{health}",
        served_name=spec.name,
        api_key=api_key,
        metrics_url=f"{base}{metrics}",
        socket_path=socket_path,
        health_timeout=health_timeout,
    )


def engine_flags(args: dict[str, EngineArg]) -> list[str]:
    """`{max-model-len: 1024, enforce-eager: true}` → `--max-model-len 1024 --enforce-eager`."""
    flags: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags.append(str(value))
    return flags
