"""An OpenAI-compatible server someone else runs: no process, ready while `/models` answers.

It gets no port, no devices and no memory check, and its metrics are its owner's to scrape.
"""

from backends.base import ENGINE_APIS, Launch, Slot
from backends.memory import Budget, Estimate
from backends.spec import ModelSpec


class ExternalAdapter:
    has_process = False
    releases = "any server that answers GET /v1/models with the OpenAI list"
    apis = ENGINE_APIS  # unknown: every request goes through, and the server answers for itself
    listens_on_socket = False
    devices = ("cuda", "cpu")  # `device:` means nothing here; the spec's default is accepted
    pipeline_parallel = False
    context_flag = None
    reasoning_parsers: dict[str, str] = {}  # no flags to pass: only `think_tags` applies

    def side_ports(self, spec: ModelSpec) -> int:
        return 0

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
        return Launch(
            argv=[],
            env={},
            base_url=str(spec.url).rstrip("/"),
            health_url=None,
            served_name=spec.upstream_model or spec.name,
            api_key=spec.api_key or None,
        )

    def memory_budget(
        self, need: Estimate, total: int, free: int, spec: ModelSpec
    ) -> Budget | None:
        return None
