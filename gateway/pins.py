"""Stored responses stay with the replica that stored them.

An engine keeps the responses it made (`store: true`) in its own memory: another replica of
the same model answers "not found" for them, and so does the same replica once restarted. So
the gateway remembers which replica, in which of its lives (`Worker.started_at`), made each
response, and sends the response's retrieval, its cancellation and its continuations
(`previous_response_id`) there. When that replica is gone the client is told so, instead of
getting another replica's "not found".

The table is in memory and bounded: the oldest pins go first once it holds MAX_PINS.
"""

from collections import OrderedDict

from backends.supervisor import Supervisor, Worker
from gateway.errors import NoReadyReplica, ResponseNotFound

MAX_PINS = 100_000  # ~100 bytes each


class ResponsePins:
    def __init__(self, limit: int = MAX_PINS) -> None:
        self.limit = limit
        self._pins: OrderedDict[str, tuple[str, float | None]] = OrderedDict()

    def remember(self, response_id: str, worker: Worker) -> None:
        self._pins[response_id] = (worker.id, worker.started_at)
        self._pins.move_to_end(response_id)
        if len(self._pins) > self.limit:
            self._pins.popitem(last=False)

    def replica(self, response_id: str, supervisor: Supervisor) -> Worker:
        """The replica holding `response_id`; ResponseNotFound when it is gone or unknown,
        NoReadyReplica while it is up but not answering probes."""
        pin = self._pins.get(response_id)
        if pin is None:
            raise ResponseNotFound(
                f"response `{response_id}` was not made through this gateway since it started "
                "(responses are stored by the engine replica that made them)",
                "response_id",
            )
        worker_id, started_at = pin
        worker = supervisor.get(worker_id)
        if worker is None or worker.started_at != started_at:
            raise ResponseNotFound(
                f"response `{response_id}` was stored by worker {worker_id}, which has "
                "restarted since: an engine keeps stored responses in memory only",
                "response_id",
            )
        if not worker.is_ready:
            raise NoReadyReplica(
                f"response `{response_id}` is stored by worker {worker_id}, which is "
                f"{worker.state.value}"
            )
        return worker
