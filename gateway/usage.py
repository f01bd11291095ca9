"""Usage, one row per request, written to the store in batches by one writer.

A request that ended is in the store within FLUSH_SECONDS. While the store is down the rows wait
in memory, at most MAX_WAITING of them (the oldest are dropped past that, and counted), and are
written once it is back.
"""

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable

from gateway.store import Store, StoreDown, UsageRow

log = logging.getLogger("enginegate.usage")

FLUSH_SECONDS = 0.5
MAX_WAITING = 100_000
BATCH = 5_000


class UsageLog:
    def __init__(
        self,
        store: Store,
        on_written: Callable[[str, int], None],
        on_store: Callable[[StoreDown | None], None],
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.store = store
        self.on_written = on_written  # (key, tokens): those tokens are in the store now
        self.on_store = on_store  # None: the store took a batch; else why it did not
        self.max_waiting = max_waiting
        self.waiting: deque[UsageRow] = deque()
        self.dropped = 0

    def add(self, row: UsageRow) -> None:
        if len(self.waiting) >= self.max_waiting:
            self.waiting.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage: the store is not taking rows; %d dropped so far", self.dropped)
        self.waiting.append(row)

    async def run(self) -> None:
        """Flush every FLUSH_SECONDS until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> bool:
        """Write what waits, a batch at a time; False when the store refused."""
        while self.waiting:
            batch = list(itertools.islice(self.waiting, BATCH))
            try:
                await asyncio.to_thread(self.store.add_usage, batch)
            except StoreDown as exc:
                self.on_store(exc)
                return False
            self.on_store(None)
            # Rows are added at the end and dropped from the front only, so those of the batch
            # still waiting are at the front.
            for row in batch:
                if self.waiting and self.waiting[0] is row:
                    self.waiting.popleft()
                self.on_written(row.key, row.prompt_tokens + row.completion_tokens)
        return True
