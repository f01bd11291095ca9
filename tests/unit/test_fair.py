"""Weighted fair queueing of a saturated model's line (fair.py), alone and in Admission."""

import asyncio
from collections import Counter

from gateway.fair import WEIGHTS, FairLine
from gateway.limits import Admission


def futures(n: int) -> list[asyncio.Future[None]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(n)]


async def test_one_key_is_first_come_first_served() -> None:
    line, turns = FairLine(), futures(5)
    for turn in turns:
        line.append(turn, "k", WEIGHTS["normal"])
    assert [line.popleft() for _ in turns] == turns
    assert len(line) == 0


async def test_a_light_key_does_not_wait_behind_a_flood() -> None:
    """1. A heavy key puts 32 requests in line; 2. one is served; 3. a light key's request
    arrives: it is the next but one, not the 32nd."""
    line = FairLine()
    heavy, (light,) = futures(32), futures(1)
    for turn in heavy:
        line.append(turn, "heavy", WEIGHTS["normal"])
    assert line.popleft() is heavy[0]
    line.append(light, "light", WEIGHTS["normal"])
    served = [line.popleft() for _ in range(3)]
    assert light in served[:2]


async def test_priority_classes_share_by_weight() -> None:
    line = FairLine()
    for turn in futures(40):
        line.append(turn, "low", WEIGHTS["low"])
    high = futures(40)
    for turn in high:
        line.append(turn, "high", WEIGHTS["high"])
    first = [line.popleft() for _ in range(25)]
    counts = Counter("high" if turn in high else "low" for turn in first)
    assert counts == {"high": 20, "low": 5}


async def test_a_turn_that_gave_up_is_skipped() -> None:
    line, (a, b) = FairLine(), futures(2)
    line.append(a, "k", 1)
    line.append(b, "k", 1)
    line.remove(a)
    assert len(line) == 1 and line.popleft() is b


async def test_admission_hands_a_freed_slot_to_the_light_key_first() -> None:
    """1. One slot, held; 2. a heavy key queues 8 requests; 3. a light key queues one; 4. the
    slot is freed: the light key's request gets it before most of the heavy key's."""
    admission = Admission(1, max_queue=20, queue_timeout=5)
    await admission.enter("heavy", 2)
    order: list[str] = []

    async def request(key: str) -> None:
        await admission.enter(key, 2)
        order.append(key)
        await asyncio.sleep(0)
        admission.leave()

    tasks = [asyncio.create_task(request("heavy")) for _ in range(8)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(request("light")))
    await asyncio.sleep(0)
    admission.leave()
    await asyncio.gather(*tasks)
    assert order.index("light") <= 1
    assert admission.in_flight == 0 and admission.queued == 0
