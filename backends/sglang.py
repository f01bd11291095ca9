"""SGLang: `python -m sglang.launch_server` (0.5.23 still accepts it beside `sglang serve`).

Facts relied on (../shared/ENGINES.md §2, read again in the 0.5.23 wheel):
- Every flag is generated from `srt/arg_groups/fields/*.py`; the ones set here are checked
  against SGLang's own parser in tests/unit/test_sglang_adapter.py.
- `--nccl-port` is the torch.distributed TCPStore port, bound by the scheduler even at TP=1.
  Unset, SGLang picks a random one in the parent and binds it later in a child, so two
  instances started together can pick the same one: we hand it out with the HTTP port.
  Everything else is ZMQ over IPC files on one host without attention-DP (`PortArgs.init_new`).
- The key is read from `--api-key` only: there is no environment variable for it (a `--config`
  YAML file is the one other way). It is per worker and random, and the engine binds 127.0.0.1.
- `/health` runs a one-token generation and takes at least a second (up to 20 s before it
  gives up); `/ready` is cheap and answers 200 only once warm-up is done and until SIGTERM, so
  the supervisor polls `/ready`. `/health`, `/ready` and `/metrics` skip the key.
- `/metrics` exists only with `--enable-metrics`.
"""

from backends.base import Launch, Slot, engine_flags, local_launch
from backends.reasoning import parser_name
from backends.spec import ModelSpec

DEFAULT_COMMAND = ("python3", "-m", "sglang.launch_server")


class SglangAdapter:
    def side_ports(self, spec: ModelSpec) -> int:
        return 1  # --nccl-port

    def launch(
        self, slot: Slot, port: int, api_key: str, side_ports: tuple[int, ...] = ()
    ) -> Launch:
        spec = slot.model
        if len(side_ports) != self.side_ports(spec):
            raise ValueError(f"sglang needs {self.side_ports(spec)} side port, got {side_ports}")
        argv = [*(spec.command or DEFAULT_COMMAND)]
        argv += ["--model-path", str(spec.model), "--served-model-name", spec.name]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--api-key", api_key]
        argv += ["--tp-size", str(spec.tp), "--pp-size", str(spec.pp)]
        argv += ["--nccl-port", str(side_ports[0]), "--enable-metrics"]
        reasoning = parser_name(spec.reasoning, "sglang")
        if reasoning:
            argv += ["--reasoning-parser", reasoning]
        argv += engine_flags(spec.engine_args)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slot.gpus))}
        return local_launch(argv, env, spec, port, api_key, "/ready")
