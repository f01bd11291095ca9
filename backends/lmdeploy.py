"""LMDeploy: `lmdeploy serve api_server MODEL`, TurboMind or PyTorch backend.

Facts relied on (../shared/ENGINES.md §3 and 6.1, read again in the 0.18.0 wheel; the flags
set here are checked against LMDeploy's own parser in tests/unit/test_lmdeploy_adapter.py):
- The CLI parses strictly and has no pipeline-parallel flag (the spec refuses `pp > 1`), no
  `--enable-metrics` (metrics are on unless `--disable-metrics`), and `--api-keys` on argv is
  the only way to give a key.
- `--backend` defaults to turbomind, which falls back to pytorch by itself when TurboMind
  cannot run the model; the spec's `lmdeploy_backend` is passed only when set.
- PyTorch with tp > 1 starts a local Ray cluster by default (or joins RAY_ADDRESS); the mp
  executor needs none. Its torch.distributed store port comes from MASTER_PORT when set
  (`MPExecutor.setup_master_addr` uses setdefault), else a random one: we allocate it, so two
  instances never share one. The variable is harmless to TurboMind, which never reads it.
- `/health` is 200 with `{"status": "healthy"}` once the engine answered its first probe
  (503 `initializing` before); it skips the key, but `/metrics` and `/v1/models` need it.

Known limitation: the server has no Unix socket option (as vLLM's `--uds`), so it listens on
a loopback port any local user can connect to. In 0.18.0 that is safe only because the key
guards every route but the `/health`, `/docs`, `/redoc` and `/nodes` prefixes
(`serve/utils/server_utils.py::AuthenticationMiddleware.skip_prefixes`, `/generate` included);
its docstring says every path outside /v1 goes through unchecked. Should the code come to do
that, local users could run inference around the gateway's keys and limits: re-read it on
every LMDeploy upgrade.
"""

from dataclasses import replace

from backends.base import Launch, Slot, engine_flags, local_launch
from backends.memory import Budget, Estimate, arg_number, format_gib
from backends.reasoning import parser_flag
from backends.spec import ModelSpec

DEFAULT_COMMAND = ("lmdeploy", "serve", "api_server")
CACHE_SHARE = 0.8  # --cache-max-entry-count's default
# 0.18 folded its R1/QwQ parsers into `default` and keeps `deepseek-r1` only as a deprecated alias.
REASONING_PARSERS = {"deepseek_r1": "default", "deepseek_v3": "deepseek-v3", "qwen3": "default"}


class LmdeployAdapter:
    has_process = True
    releases = "0.18 (PyTorch backend run on an H200; flags checked against its parser)"
    # 0.18: serve/anthropic/endpoints/messages.py and messages_count_tokens.py; POST
    # /v1/responses only (serve/openai/responses/serving.py): no GET or cancel, and
    # `previous_response_id` is refused (responses/request.py). No rerank, score or tokenize.
    apis = frozenset(("responses", "messages"))
    listens_on_socket = False
    devices = ("cuda",)
    pipeline_parallel = False  # `serve api_server` has no pipeline-parallel flag
    context_flag = "session-len"
    reasoning_parsers = REASONING_PARSERS

    def side_ports(self, spec: ModelSpec) -> int:
        return 1 if _may_run_pytorch_tp(spec) else 0  # MASTER_PORT

    def launch(
        self,
        slot: Slot,
        port: int,
        api_key: str,
        side_ports: tuple[int, ...] = (),
        socket_path: str | None = None,
        host: str | None = None,
    ) -> Launch:
        spec = slot.model
        if len(side_ports) != self.side_ports(spec):
            raise ValueError(f"lmdeploy needs {self.side_ports(spec)} side ports, got {side_ports}")
        argv = [*(spec.command or DEFAULT_COMMAND), str(spec.model)]
        argv += ["--model-name", spec.name]
        argv += ["--server-name", host or "127.0.0.1", "--server-port", str(port)]
        argv += ["--api-keys", api_key]
        argv += ["--tp", str(spec.tp)]
        if spec.lmdeploy_backend:
            argv += ["--backend", spec.lmdeploy_backend]
        argv += parser_flag(spec.reasoning, self.reasoning_parsers)
        argv += engine_flags(spec.engine_args)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slot.gpus))}
        if side_ports:
            env["LMDEPLOY_EXECUTOR_BACKEND"] = "mp"
            env["MASTER_ADDR"] = "127.0.0.1"
            env["MASTER_PORT"] = str(side_ports[0])
        return local_launch(argv, env, spec, port, api_key, "/health", host=host)

    def memory_budget(self, need: Estimate, total: int, free: int, spec: ModelSpec) -> Budget:
        """`--cache-max-entry-count` of the memory *free after the weights* is the KV cache."""
        share = arg_number(spec.engine_args, "cache-max-entry-count", CACHE_SHARE)
        rule = f"{share:g} x (free {format_gib(free)} - weights - overhead)"
        after_weights = free - need.weights - need.overhead
        budget = Budget(free, rule, kv_room=int(share * after_weights))
        if after_weights <= 0:
            loaded = format_gib(need.weights + need.overhead)
            return replace(budget, problem=f"weights + overhead {loaded} > free {format_gib(free)}")
        return budget


def _may_run_pytorch_tp(spec: ModelSpec) -> bool:
    """Unset backend counts: TurboMind may fall back to PyTorch for this model."""
    return spec.tp > 1 and spec.lmdeploy_backend != "turbomind"
