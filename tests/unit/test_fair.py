"""Weighted fair queueing of a saturated model's line (fair.py), alone and in Admission."""

import asyncio
import random
from collections import Counter

import pytest

from gateway.errors import RateLimited
from gateway.fair import WEIGHTS, FairLine
from gateway.limits import Admission


def futures(n: int) -> list[asyncio.Future[None]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(n)]


async def test_one_key_is_first_come_first_served() -> None:
    line, turns = FairLine(), futures(5)
    for turn in turns:
        line.append(turn, "k", WEIGHTS["normal"])
    assert [line.popleft() for _ in turns] == [(turn, "k") for turn in turns]
    assert len(line) == 0 and line.popleft() is None


async def test_a_light_key_does_not_wait_behind_a_flood() -> None:
    """1. A heavy key puts 32 requests in line; 2. one is served; 3. a light key's request
    arrives: it is the next but one, not the 32nd."""
    line = FairLine()
    heavy, (light,) = futures(32), futures(1)
    for turn in heavy:
        line.append(turn, "heavy", WEIGHTS["normal"])
    assert line.popleft() == (heavy[0], "heavy")
    line.append(light, "light", WEIGHTS["normal"])
    served = [turn for turn, _ in filter(None, (line.popleft() for _ in range(3)))]
    assert light in served[:2]


async def test_priority_classes_share_by_weight() -> None:
    line = FairLine()
    for turn in futures(40):
        line.append(turn, "low", WEIGHTS["low"])
    high = futures(40)
    for turn in high:
        line.append(turn, "high", WEIGHTS["high"])
    first = [turn for turn, _ in filter(None, (line.popleft() for _ in range(25)))]
    counts = Counter("high" if turn in high else "low" for turn in first)
    assert counts == {"high": 20, "low": 5}


async def test_a_turn_that_gave_up_is_skipped() -> None:
    line, (a, b) = FairLine(), futures(2)
    line.append(a, "k", 1)
    line.append(b, "k", 1)
    line.remove(a)
    assert len(line) == 1 and line.popleft() == (b, "k")


async def test_admission_hands_a_freed_slot_to_the_light_key_first() -> None:
    """1. One slot, held; 2. a heavy key queues 8 requests; 3. a light key queues one; 4. the
    slot is freed: the light key's request gets it before most of the heavy key's."""
    admission = Admission(1, max_queue=20, queue_timeout=5, reserve=0)
    await admission.enter("heavy", 2)
    order: list[str] = []

    async def request(key: str) -> None:
        await admission.enter(key, 2)
        order.append(key)
        await asyncio.sleep(0)
        admission.leave(key)

    tasks = [asyncio.create_task(request("heavy")) for _ in range(8)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(request("light")))
    await asyncio.sleep(0)
    admission.leave("heavy")
    await asyncio.gather(*tasks)
    assert order.index("light") <= 1
    assert admission.in_flight == 0 and admission.queued == 0


class Holder:
    """Requests that enter an Admission and hold their slot until released, in order."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held: list[str] = []  # keys admitted, in admission order
        self.finished: list[str] = []  # keys whose request was released
        self._release: dict[str, list[asyncio.Event]] = {}

    def send(self, key: str) -> asyncio.Task[None]:
        done = asyncio.Event()
        self._release.setdefault(key, []).append(done)
        return asyncio.create_task(self._request(key, done))

    async def _request(self, key: str, done: asyncio.Event) -> None:
        await self.admission.enter(key, WEIGHTS["normal"])
        self.held.append(key)
        await done.wait()
        self.admission.leave(key)

    async def finish(self, key: str) -> None:
        """Release `key`'s oldest request (and let the freed slot change hands)."""
        self._release[key].pop(0).set()
        self.finished.append(key)
        await asyncio.sleep(0.01)


async def test_a_key_with_nothing_in_flight_takes_the_reserve_past_a_flood() -> None:
    """1. A heavy key fills max_in_flight 4 and puts 8 in line; 2. a light key's request is
    admitted at once, the 5th in flight; 3. a second idle key and a second light request (the
    key now holds one) wait: the reserve is one slot and the bound is 5."""
    admission = Admission(4, max_queue=20, queue_timeout=5, reserve=1)
    holder = Holder(admission)
    tasks = [holder.send("heavy") for _ in range(12)]
    await asyncio.sleep(0)
    assert (admission.in_flight, admission.queued) == (4, 8)
    tasks.append(holder.send("light"))
    await asyncio.sleep(0)
    assert holder.held.count("light") == 1 and admission.in_flight == 5
    tasks += [holder.send("other"), holder.send("light")]
    await asyncio.sleep(0)
    assert (admission.in_flight, admission.queued) == (5, 10)
    # 4. a heavy request ends while the model is past its limit: the freed slot goes to no
    # heavy request (that key holds slots) but to the first idle key in line, `other`
    await holder.finish("heavy")
    assert holder.held[-1] == "other" and admission.in_flight == 5
    # 5. the light key's first request ends: with nothing in flight, its second one is idle
    # and takes the slot (still 5); 6. a heavy request ends: every waiting key holds a slot,
    # so the model shrinks back to 4
    await holder.finish("light")
    assert holder.held.count("light") == 2 and admission.in_flight == 5
    await holder.finish("heavy")
    assert (admission.in_flight, admission.queued) == (4, 8)
    for _ in range(40):
        for key in ("heavy", "light", "other"):
            if holder._release.get(key):
                await holder.finish(key)
                assert admission.in_flight <= 5
    await asyncio.gather(*tasks)
    assert (admission.in_flight, admission.queued) == (0, 0)
    assert admission._holding == {}


async def test_one_key_never_goes_past_max_in_flight() -> None:
    """A single key (or fifo, where every request enters as the same key) gets no reserve."""
    admission = Admission(2, max_queue=20, queue_timeout=5, reserve=3)
    holder = Holder(admission)
    tasks = [holder.send("") for _ in range(6)]
    await asyncio.sleep(0)
    assert (admission.in_flight, admission.queued) == (2, 4)
    for _ in range(6):
        await holder.finish("")
        assert admission.in_flight <= 2
    await asyncio.gather(*tasks)
    assert admission.in_flight == 0


async def test_the_reserve_admits_an_idle_key_even_when_the_line_is_full() -> None:
    """A flood that fills max_queue makes its own requests 429, not an idle key's."""
    admission = Admission(1, max_queue=2, queue_timeout=5, reserve=1)
    holder = Holder(admission)
    tasks = [holder.send("heavy") for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited):
        await admission.enter("heavy")
    await admission.enter("light")
    assert admission.in_flight == 2
    admission.leave("light")
    assert admission.in_flight == 1
    for _ in range(3):
        await holder.finish("heavy")
    await asyncio.gather(*tasks)
    assert admission.in_flight == 0


async def test_many_keys_never_exceed_max_in_flight_plus_reserve() -> None:
    """Random arrivals and finishes of 5 keys (seeded): in flight never passes 4 + 2, every
    request is served, and nothing is left held."""
    rng = random.Random(12)
    admission = Admission(4, max_queue=200, queue_timeout=30, reserve=2)
    holder = Holder(admission)
    keys = ["a", "b", "c", "d", "e"]
    tasks = []
    peak = 0
    for _ in range(150):
        if rng.random() < 0.6:
            tasks.append(holder.send(rng.choice(keys)))
            await asyncio.sleep(0)
        else:
            running = [k for k in keys if holder.held.count(k) > holder.finished.count(k)]
            if running:
                await holder.finish(rng.choice(running))
        peak = max(peak, admission.in_flight)
        assert admission.in_flight <= 6
    while unreleased := [k for k in keys if holder._release.get(k)]:
        await holder.finish(rng.choice(unreleased))
        assert admission.in_flight <= 6
    await asyncio.gather(*tasks)
    assert peak == 6  # the reserve was used
    assert (admission.in_flight, admission.queued, admission._holding) == (0, 0, {})


async def test_a_key_left_with_nothing_in_flight_takes_the_reserve_from_the_line() -> None:
    """1. Under max_in_flight 2, `k` and the heavy key hold one slot each; 2. the heavy key
    queues two more, `k` one; 3. `k`'s first request ends: the freed slot goes to the head
    of the line (heavy), and `k`, now with nothing in flight, takes the reserve (3 in flight)
    instead of waiting behind the heavy key."""
    admission = Admission(2, max_queue=20, queue_timeout=5, reserve=1)
    holder = Holder(admission)
    tasks = [holder.send("k"), holder.send("heavy")]
    await asyncio.sleep(0)
    tasks += [holder.send("heavy"), holder.send("heavy"), holder.send("k")]
    await asyncio.sleep(0)
    assert (admission.in_flight, admission.queued) == (2, 3)
    await holder.finish("k")
    assert holder.held == ["k", "heavy", "heavy", "k"]
    assert (admission.in_flight, admission.queued) == (3, 1)
    for key in ("heavy", "heavy", "heavy", "k"):
        await holder.finish(key)
    await asyncio.gather(*tasks)
    assert (admission.in_flight, admission._holding) == (0, {})
