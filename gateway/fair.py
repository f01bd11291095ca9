"""The line of requests waiting for a model's admission slot, served by weighted fair queueing.

When a model is saturated, a freed slot goes to the waiting request with the smallest virtual
finish tag: a request of key k arriving at virtual time V gets tag max(V, last tag of k) + 1/w,
w the weight of k's priority class. A key that floods the line only pushes its own tags back,
so a key sending one request at a time waits about one turn, not behind the whole flood; a
`high` key gets four turns for every one of a `low` key when both keep requests waiting.
(Start-time fair queueing, Goyal et al. 1996, with every request costing the same.)

With one key (or `gateway.queueing: fifo`, where every request counts as the same key) the
tags only grow, and the line is first come, first served.
"""

import asyncio
import heapq
import itertools
from collections.abc import Container
from dataclasses import dataclass, field

WEIGHTS = {"low": 1.0, "normal": 2.0, "high": 4.0}


@dataclass(order=True)
class _Entry:
    tag: float
    seq: int
    turn: asyncio.Future[None] = field(compare=False)
    key: str = field(compare=False)


class FairLine:
    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._entries: dict[asyncio.Future[None], _Entry] = {}
        self._last: dict[str, float] = {}  # each key's last tag
        self._now = 0.0  # virtual time: the tag of the last request served
        self._seq = itertools.count()  # equal tags: first come, first served

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, turn: asyncio.Future[None], key: str, weight: float) -> None:
        tag = max(self._now, self._last.get(key, 0.0)) + 1.0 / weight
        self._last[key] = tag
        entry = _Entry(tag, next(self._seq), turn, key)
        self._entries[turn] = entry
        heapq.heappush(self._heap, entry)

    def popleft(self, busy: Container[str] = ()) -> tuple[asyncio.Future[None], str] | None:
        """The next turn to serve and its key, passing over keys in `busy`; None when nobody
        (not busy) waits. Passing over looks at every waiting entry: the line is max_queue
        long at most, and only a model past max_in_flight asks for it (limits.py)."""
        self._drop_removed()
        if busy:
            entry = min((e for e in self._entries.values() if e.key not in busy), default=None)
        else:
            entry = self._heap[0] if self._heap else None
        if entry is None:
            return None
        del self._entries[entry.turn]  # its heap entry is dropped when it comes up
        self._now = max(self._now, entry.tag)
        if not self._entries:
            self._last.clear()  # an idle line forgets: tags restart from now
            self._heap.clear()
        return entry.turn, entry.key

    def remove(self, turn: asyncio.Future[None]) -> None:
        """Take a turn out of the line (it gave up); its heap entry is skipped later."""
        self._entries.pop(turn)

    def _drop_removed(self) -> None:
        while self._heap and self._entries.get(self._heap[0].turn) is not self._heap[0]:
            heapq.heappop(self._heap)
