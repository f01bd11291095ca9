"""An OpenAI-compatible server someone else runs: no process, ready while `/models` answers."""

from backends.base import Launch, Slot
from backends.spec import ModelSpec


class ExternalAdapter:
    def side_ports(self, spec: ModelSpec) -> int:
        return 0

    def launch(
        self, slot: Slot, port: int, api_key: str, side_ports: tuple[int, ...] = ()
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
