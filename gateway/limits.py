"""Admission: per model, at most `max_in_flight` requests at once and a bounded wait queue.

A request that finds every slot taken waits in line up to `queue_timeout` seconds; one that
finds the line full, or waits too long, gets 429 with a Retry-After hint. A slot freed by a
finished request goes straight to the line, so a newcomer never takes it past those waiting.
Who in the line goes next is fair.py's: weighted fair queueing across keys by their priority
class, which is first come, first served among one key's requests.
"""

import asyncio
import math

from gateway.errors import RateLimited
from gateway.fair import FairLine


class Admission:
    def __init__(self, max_in_flight: int | None, max_queue: int = 0, queue_timeout: float = 30):
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self._line = FairLine()

    @property
    def queued(self) -> int:
        return len(self._line)

    async def enter(self, key: str = "", weight: float = 1.0) -> None:
        """Take a slot, waiting in line if needed (`key`'s share of it is `weight`); raises
        RateLimited when there is none."""
        if self.max_in_flight is None or (self.in_flight < self.max_in_flight and not self._line):
            self.in_flight += 1
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
                self.leave()  # pass on the slot we were handed but cannot use
            else:
                self._line.remove(turn)
            raise

    def leave(self) -> None:
        """Give the slot back: to the next in line, or to the pool."""
        while self._line:
            turn = self._line.popleft()
            if not turn.done():
                turn.set_result(None)  # in_flight stays: the slot changes hands
                return
        self.in_flight -= 1

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.queue_timeout / 4))
