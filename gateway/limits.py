"""Admission: per model, at most `max_in_flight` requests at once and a bounded wait queue.

A request that finds every slot taken waits in line up to `queue_timeout` seconds; one that
finds the line full, or waits too long, gets 429 with a Retry-After hint. A slot freed by a
finished request goes straight to the line, so a newcomer never takes it past those waiting.
Who in the line goes next is fair.py's: weighted fair queueing across keys by their priority
class, which is first come, first served among one key's requests.

The reserve: a key with nothing in flight on the model may go past `max_in_flight` by one,
while fewer than `reserve` requests are past it. Without it a key sending one request at a
time waits, even at the head of a fair line, for one of a flooding key's requests to finish
(its whole duration over `max_in_flight`); with it, it goes straight to the engine. The bound
stays hard: at most `max_in_flight + reserve` in flight, whatever the number of keys, and a
key holds at most one reserve slot (it holds one only while it has nothing else in flight).
A freed slot goes to the next in line while the model is under `max_in_flight`; in the reserve,
to the first in line whose key has nothing in flight, if any (one key's requests keep their
order either way); otherwise the model shrinks back toward its limit.
Requests entered without a key (`queueing: fifo`) all count as one key, which is never idle
while the model is saturated: no reserve, plain first come, first served.
"""

import asyncio
import math
from collections.abc import Container

from gateway.errors import RateLimited
from gateway.fair import FairLine

RESERVE = 1  # slots past max_in_flight, each for a key with nothing in flight


class Admission:
    def __init__(
        self,
        max_in_flight: int | None,
        max_queue: int = 0,
        queue_timeout: float = 30,
        reserve: int = RESERVE,
    ):
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.reserve = reserve
        self.in_flight = 0
        self._line = FairLine()
        self._holding: dict[str, int] = {}  # key → its requests in flight (none: absent)

    def configure(self, max_in_flight: int | None, max_queue: int, queue_timeout: float) -> None:
        """New limits (a reload): a raised max_in_flight admits from the line at once, instead
        of at the next request's end; a lowered one is reached as requests end."""
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._hand_on()

    @property
    def queued(self) -> int:
        return len(self._line)

    async def enter(self, key: str = "", weight: float = 1.0) -> None:
        """Take a slot, waiting in line if needed (`key`'s share of it is `weight`); raises
        RateLimited when there is none. Pair with leave(key)."""
        if self._has_room(key):
            self._hold(key)
            return
        if len(self._line) >= self.max_queue:
            raise RateLimited(
                f"too many requests: {self.in_flight} in flight and {len(self._line)} waiting",
                retry_after=self._retry_after(),
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn, key, weight)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.queue_timeout)
        except TimeoutError:
            if turn.done():  # the slot arrived just as we gave up: keep it
                return
            self._line.remove(turn)
            raise RateLimited(
                f"waited {self.queue_timeout:g} s in line without a free slot",
                retry_after=self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            if turn.done():
                self.leave(key)  # pass on the slot we were handed but cannot use
            else:
                self._line.remove(turn)
            raise

    def leave(self, key: str = "") -> None:
        """Give `key`'s slot back; it goes to whoever in line may have it now."""
        held = self._holding[key] - 1
        if held:
            self._holding[key] = held
        else:
            del self._holding[key]
        self.in_flight -= 1
        self._hand_on()

    def _hand_on(self) -> None:
        """Admit from the line while there is room: under max_in_flight the next in line, in
        the reserve the first whose key has nothing in flight. Afterwards nobody who waits
        could enter, which is what enter() relies on."""
        while self._line:
            limit = self.max_in_flight
            if limit is None or self.in_flight < limit:
                busy: Container[str] = ()
            elif self.in_flight < limit + self.reserve:
                busy = self._holding
            else:
                return
            served = self._line.popleft(busy)
            if served is None:
                return
            turn, heir = served
            if not turn.done():
                turn.set_result(None)
                self._hold(heir)

    def _has_room(self, key: str) -> bool:
        limit = self.max_in_flight
        if limit is None or (self.in_flight < limit and not self._line):
            return True
        return key not in self._holding and self.in_flight < limit + self.reserve

    def _hold(self, key: str) -> None:
        self.in_flight += 1
        self._holding[key] = self._holding.get(key, 0) + 1

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.queue_timeout / 4))
