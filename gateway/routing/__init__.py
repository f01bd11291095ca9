"""Which ready replica gets the next request. One policy per module, behind one Protocol.

`key_for` reads what a policy needs from the request (nothing, a prefix, a session id) and
`choose` picks among the ready replicas, never one in `exclude` (already tried).
"""

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, Protocol

from backends.supervisor import Worker
from gateway.routing.least_outstanding import LeastOutstanding
from gateway.routing.prefix_affinity import PrefixAffinity

PolicyName = Literal["least_outstanding", "prefix_affinity"]


class RoutingPolicy(Protocol):
    def key_for(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None: ...

    def choose(
        self, workers: Sequence[Worker], key: str | None, exclude: Collection[str] = ()
    ) -> Worker | None: ...


def make_policy(name: PolicyName, prefix_chars: int = 512) -> RoutingPolicy:
    if name == "prefix_affinity":
        return PrefixAffinity(prefix_chars=prefix_chars)
    return LeastOutstanding()


__all__ = ["LeastOutstanding", "PolicyName", "PrefixAffinity", "RoutingPolicy", "make_policy"]
