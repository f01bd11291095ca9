"""vLLM: `vllm serve` (GPU builds) or `python -m vllm.entrypoints.openai.api_server` (CPU build).

Facts relied on (../shared/ENGINES.md §1): `/health` answers 200 once the engine is up and the
socket refuses connections before; `/metrics` is always on and skips the key; the CPU build
needs the mp executor and one core list per rank in VLLM_CPU_OMP_THREADS_BIND for tp*pp > 1.

VLLM_API_KEY guards only paths under /v1, /v2, /inference and /cohere
(`entrypoints/serve/middleware/authenticate.py`): /invocations runs a chat completion for
anyone who connects. So the engine serves on a Unix socket in a private directory
(`--uds PATH`: "If set, host and port arguments are ignored"), never on a loopback port that
every local user can reach (security finding 19, backends/sockets.py).
"""

from backends.base import ENGINE_APIS, Launch, Slot, engine_flags, local_launch
from backends.memory import Budget, Estimate, arg_number, format_gib
from backends.reasoning import parser_flag
from backends.spec import ModelSpec

DEFAULT_COMMAND = ("vllm", "serve")
UTILIZATION = 0.92  # --gpu-memory-utilization's default
REASONING_PARSERS = {"deepseek_r1": "deepseek_r1", "deepseek_v3": "deepseek_v3", "qwen3": "qwen3"}


class VllmAdapter:
    has_process = True
    releases = "0.26 (GPU image, run on H100/H200) and 0.32 (CPU build, in every test run)"
    # entrypoints/openai/responses/api_router.py (stored responses need the engine started with
    # VLLM_ENABLE_RESPONSES_API_STORE=1), anthropic/api_router.py, pooling/scoring/api_router.py,
    # serve/tokenize/api_router.py (/tokenize and /detokenize at the root, not under /v1)
    apis = ENGINE_APIS
    listens_on_socket = True
    devices = ("cuda", "cpu")
    pipeline_parallel = True
    context_flag = "max-model-len"
    reasoning_parsers = REASONING_PARSERS

    def side_ports(self, spec: ModelSpec) -> int:
        return 0  # one host, no DP: ZMQ over IPC and a file-store rendezvous (ENGINES.md 1.2)

    def launch(
        self,
        slot: Slot,
        port: int,
        api_key: str,
        side_ports: tuple[int, ...] = (),
        socket_path: str | None = None,
        host: str | None = None,
    ) -> Launch:
        if not socket_path and not host:
            raise ValueError("vllm serves on a Unix socket: launch needs socket_path")
        spec = slot.model
        argv = [*(spec.command or DEFAULT_COMMAND)]
        argv += ["--model", str(spec.model), "--served-model-name", spec.name]
        if socket_path:
            argv += ["--uds", socket_path]
        else:
            argv += ["--host", str(host), "--port", str(port)]
        argv += ["--tensor-parallel-size", str(spec.tp), "--pipeline-parallel-size", str(spec.pp)]
        argv += parser_flag(spec.reasoning, self.reasoning_parsers)
        args = dict(spec.engine_args)
        if spec.ranks > 1 and spec.device == "cpu":
            args.setdefault("distributed-executor-backend", "mp")
        env: dict[str, str] = {}
        if spec.idle_action == "sleep":
            args.setdefault("enable-sleep-mode", True)
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up are "dev" routes
        argv += engine_flags(args)
        # The key travels in the environment: argv is world-readable in `ps`.
        env["VLLM_API_KEY"] = api_key
        if spec.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(slot.cpu_ranks) or "auto"
            env["VLLM_CPU_KVCACHE_SPACE"] = _gib(spec.kv_cache_gib)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.gpus))
        return local_launch(
            argv, env, spec, port, api_key, "/health", socket_path=socket_path, host=host
        )

    def memory_budget(self, need: Estimate, total: int, free: int, spec: ModelSpec) -> Budget:
        """`--gpu-memory-utilization` of *total* memory holds weights, activations and the KV
        cache, and vLLM refuses to start unless that much is free."""
        share = arg_number(spec.engine_args, "gpu-memory-utilization", UTILIZATION)
        rule = f"{share:g} x total {format_gib(total)}"
        budget = int(share * total)
        kv_room = budget - need.weights - need.overhead
        if budget > free:
            problem = f"{rule} = {format_gib(budget)} > free {format_gib(free)}"
            return Budget(budget, rule, kv_room, problem)
        return Budget(budget, rule, kv_room)


def _gib(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)
