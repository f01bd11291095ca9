"""The replica with the fewest requests in flight; ties go round-robin, so an idle fleet still
spreads requests instead of piling them on replica 0."""

import itertools
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from backends.supervisor import Worker


class LeastOutstanding:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def key_for(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        return None  # load alone decides

    def choose(
        self, workers: Sequence[Worker], key: str | None = None, exclude: Collection[str] = ()
    ) -> Worker | None:
        ready = [w for w in workers if w.is_ready and w.id not in exclude]
        if not ready:
            return None
        least = min(w.in_flight for w in ready)
        idlest = [w for w in ready if w.in_flight == least]
        return idlest[next(self._turn) % len(idlest)]
