"""SGLang: `python -m sglang.launch_server` (0.5.17 and 0.5.23 accept it beside `sglang serve`).

Releases: 0.5.17 (the last that fits torch 2.11, run on an H200 under the gateway) and 0.5.23
(flags checked against its parser). Facts relied on (../shared/ENGINES.md §2, read again in
both wheels):
- Every flag is generated from `srt/arg_groups/fields/*.py`; the ones set here are checked
  against SGLang's own parser in tests/unit/test_sglang_adapter.py.
- `--nccl-port` is the torch.distributed TCPStore port, bound by the scheduler even at TP=1.
  Unset, SGLang picks a random one in the parent and binds it later in a child, so two
  instances started together can pick the same one: we hand it out with the HTTP port.
  Everything else is ZMQ over IPC files on one host without attention-DP (`PortArgs.init_new`).
- The key is read from `--api-key` only: there is no environment variable for it (a `--config`
  YAML file is the one other way). It is per worker and random, and the engine binds 127.0.0.1.
  The key guards every route but `/health*` and `/metrics`, so unlike vLLM (backends/vllm.py)
  the engine can stay on a loopback port.
- The probe is `/health`: it answers 503 while starting (at once) and during shutdown, and
  once up runs a one-token generation, 200 as soon as the scheduler answers anything (so under
  load it costs nothing), 503 after SGLANG_HEALTH_CHECK_TIMEOUT (20 s) without an answer. That
  generation is what tells a hung scheduler from a live one, so it stays on
  (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 would make it a bare 200); the probe waits 25 s.
  Its requests are not counted in SGLang's metrics (`log_metrics=False`). `/ready` exists only
  from 0.5.2x on, and 0.5.17 answers it 401 behind the key (404 with it). `/health*` and
  `/metrics*` skip the key in both.
- `/metrics` exists only with `--enable-metrics`.
"""

from backends.base import ENGINE_APIS, Launch, Slot, engine_flags, local_launch
from backends.gpus import MIB
from backends.memory import Budget, Estimate, arg_number, format_gib
from backends.reasoning import parser_flag
from backends.spec import ModelSpec

DEFAULT_COMMAND = ("python3", "-m", "sglang.launch_server")
REASONING_PARSERS = {"deepseek_r1": "deepseek-r1", "deepseek_v3": "deepseek-v3", "qwen3": "qwen3"}


HEALTH_TIMEOUT = 25.0  # SGLANG_HEALTH_CHECK_TIMEOUT's 20 s, and room for the answer


class SglangAdapter:
    has_process = True
    releases = "0.5.17 (run on an H200) to 0.5.23 (flags checked against its parser)"
    # srt/entrypoints/http_server.py (0.5.23): /v1/responses with GET /v1/responses/{id} and
    # /cancel, /v1/messages and /count_tokens, /v1/rerank, /v1/score, /tokenize, /detokenize
    apis = ENGINE_APIS
    listens_on_socket = False
    devices = ("cuda",)
    pipeline_parallel = True
    context_flag = "context-length"
    reasoning_parsers = REASONING_PARSERS

    def side_ports(self, spec: ModelSpec) -> int:
        return 1  # --nccl-port

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
            raise ValueError(f"sglang needs {self.side_ports(spec)} side port, got {side_ports}")
        argv = [*(spec.command or DEFAULT_COMMAND)]
        argv += ["--model-path", str(spec.model), "--served-model-name", spec.name]
        argv += ["--host", host or "127.0.0.1", "--port", str(port), "--api-key", api_key]
        argv += ["--tp-size", str(spec.tp), "--pp-size", str(spec.pp)]
        argv += ["--nccl-port", str(side_ports[0]), "--enable-metrics"]
        argv += parser_flag(spec.reasoning, self.reasoning_parsers)
        argv += engine_flags(spec.engine_args)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slot.gpus))}
        return local_launch(
            argv, env, spec, port, api_key, "/health", health_timeout=HEALTH_TIMEOUT, host=host
        )

    def memory_budget(self, need: Estimate, total: int, free: int, spec: ModelSpec) -> Budget:
        """`--mem-fraction-static` of *total* holds weights and KV cache; the rest is kept for
        activations and CUDA graphs, and memory other processes hold comes out of the KV
        cache. Unset, SGLang picks the fraction itself (`reserve_mib`)."""
        if "mem-fraction-static" in spec.engine_args:
            share = arg_number(spec.engine_args, "mem-fraction-static", 0)
            rule = f"{share:g} x total {format_gib(total)}"
        else:
            reserve = reserve_mib(total // MIB, spec.ranks, need.is_mla) * MIB
            share = round((total - reserve) / total, 3)
            rule = f"auto {share:g} x total {format_gib(total)}"
        budget = int(share * total)
        return Budget(budget, rule, kv_room=budget - need.weights - (total - free))


def reserve_mib(total_mib: int, ranks: int, is_mla: bool) -> float:
    """MiB SGLang keeps outside --mem-fraction-static when it picks the fraction itself
    (0.5.23 `arg_groups/memory_hook.py`): activations for one prefill chunk, CUDA graphs, a
    slack per 8 ranks. Its own figure also depends on flags not modelled here (DP attention,
    speculative decoding, DeepEP)."""
    sizes = ((20, 2048, 8), (35, 4096, 160), (60, 4096, 160), (160, 8192, 512))
    chunk, max_bs = next(((c, b) for gib, c, b in sizes if total_mib < gib * 1024), (16384, 512))
    reserve = 512 + 1.5 * max(chunk, 2048) + ranks / 8 * 1024 + 2 * max_bs
    reserve += 1.5 * 1024 if is_mla else 0  # prefill CUDA graphs with an MLA backend
    return max(reserve, 10 * 1024) if total_mib > 60 * 1024 else reserve
