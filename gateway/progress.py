"""Start-up progress: a live table on a terminal, one log line per state change otherwise."""

import asyncio
import logging
import time
from typing import TextIO

from backends.supervisor import Supervisor, Worker, WorkerState

log = logging.getLogger("enginegate")

_SETTLED = (WorkerState.READY, WorkerState.FAILED)


class Progress:
    def __init__(self, stream: TextIO, is_tty: bool) -> None:
        self.stream = stream
        self.is_tty = is_tty
        self.is_live = False  # while the live table is drawn, state changes are not logged

    def on_change(self, worker: Worker) -> None:
        if self.is_live:
            return
        if worker.state is WorkerState.READY and worker.ready_seconds is not None:
            log.info(
                "worker %s ready in %.1f s (port %s)", worker.id, worker.ready_seconds, worker.port
            )
        elif worker.state is WorkerState.FAILED:
            last = worker.last_error[-1] if worker.last_error else ""
            log.error("worker %s failed; log %s; last line: %s", worker.id, worker.log_path, last)
        else:
            log.info("worker %s %s", worker.id, worker.state.value)

    async def run(self, supervisor: Supervisor, hint: str) -> None:
        """Show progress until every worker settles, then print how to reach the gateway."""
        started = time.monotonic()
        if self.is_tty:
            await asyncio.sleep(0.5)  # let uvicorn print its start-up lines above the table
            self.is_live = True
            drawn = 0
            while not all(w.state in _SETTLED for w in supervisor.workers):
                drawn = self._draw(supervisor.workers, started, drawn)
                await asyncio.sleep(0.5)
            self._draw(supervisor.workers, started, drawn)
            self.is_live = False
        else:
            while not all(w.state in _SETTLED for w in supervisor.workers):
                await asyncio.sleep(0.5)
        ready = sum(w.is_ready for w in supervisor.workers)
        total = len(supervisor.workers)
        log.info("%d of %d workers ready after %.1f s", ready, total, time.monotonic() - started)
        if ready:
            log.info("try: %s", hint)

    def _draw(self, workers: list[Worker], started: float, drawn: int) -> int:
        lines = []
        for w in workers:
            since = w.ready_seconds if w.is_ready else time.monotonic() - (w.started_at or started)
            where = ",".join(map(str, w.slot.gpus)) or "|".join(w.slot.cpu_ranks) or "-"
            lines.append(f"  {w.id:<24} {w.state.value:<11} {since:6.1f}s  devices {where}")
        up = f"\x1b[{drawn}F" if drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        return len(lines)
