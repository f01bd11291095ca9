"""Prefix affinity: requests that share a prompt prefix go to the same replica, so the engine's
prefix cache hits, unless that replica is already busier than its fair share.

The key is the conversation so far (every message but the last, e.g. a long system prompt or
the earlier turns), or the start of the prompt when there is only one message, cut to
`prefix_chars`. A session id (header `x-session-id`, or the body's `user`) wins over the prefix.

Placement is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): walk
the ring from the key's point and take the first replica whose load is below
ceil(load_factor × (total + 1) / replicas). A hot prefix therefore spills onto the next replica
on the ring instead of overloading one, and replicas coming and going move few keys.
"""

import bisect
import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from backends.supervisor import Worker

VIRTUAL_NODES = 64
SESSION_HEADER = "x-session-id"


class PrefixAffinity:
    def __init__(self, prefix_chars: int = 512, load_factor: float = 1.25) -> None:
        self.prefix_chars = prefix_chars
        self.load_factor = load_factor
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def key_for(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        session = headers.get(SESSION_HEADER) or body.get("user")
        if isinstance(session, str) and session:
            return "session:" + session
        messages = body.get("messages")
        if isinstance(messages, list) and messages:
            context = messages[:-1] or messages
            text = json.dumps(context, sort_keys=True, ensure_ascii=False)
        else:
            text = str(body.get("prompt", ""))
        return text[: self.prefix_chars] if text else None

    def choose(
        self, workers: Sequence[Worker], key: str | None, exclude: Collection[str] = ()
    ) -> Worker | None:
        ready = [w for w in workers if w.is_ready and w.id not in exclude]
        if not ready:
            return None
        if key is None:
            return min(ready, key=lambda w: w.in_flight)
        by_id = {w.id: w for w in ready}
        points, owners = self._ring(tuple(sorted(by_id)))
        total = sum(w.in_flight for w in ready)
        capacity = math.ceil(self.load_factor * (total + 1) / len(ready))
        start = bisect.bisect(points, _hash(key))
        for step in range(len(points)):
            worker = by_id[owners[(start + step) % len(points)]]
            if worker.in_flight < capacity:
                return worker
        return min(ready, key=lambda w: w.in_flight)  # unreachable: capacity ≥ average

    def _ring(self, ids: tuple[str, ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(ids)
        if ring is None:
            nodes = sorted((_hash(f"{wid}#{v}"), wid) for wid in ids for v in range(VIRTUAL_NODES))
            ring = self._rings[ids] = ([p for p, _ in nodes], [w for _, w in nodes])
            if len(self._rings) > 64:  # replica sets change rarely; keep the cache small
                self._rings.pop(next(iter(self._rings)))
        return ring


def _hash(text: str) -> int:
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which plain UTF-8 refuses
    data = text.encode(errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
