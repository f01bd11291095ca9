"""Admission: slots, the wait line, 429s with Retry-After."""

import asyncio

import pytest

from gateway.errors import RateLimited
from gateway.limits import Admission


async def test_limit_2_queue_2_of_10_simultaneous_admits_4_and_refuses_6():
    admission = Admission(max_in_flight=2, max_queue=2, queue_timeout=5)
    release = asyncio.Event()
    admitted, refused = [], []

    async def request(i: int) -> None:
        try:
            await admission.enter()
        except RateLimited as exc:
            refused.append(exc.retry_after)
            return
        admitted.append(i)
        await release.wait()
        admission.leave()

    tasks = [asyncio.create_task(request(i)) for i in range(10)]
    await asyncio.sleep(0.05)
    assert (len(admitted), admission.queued, len(refused)) == (2, 2, 6)
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(admitted) == [0, 1, 2, 3]  # the two in line got in, in order
    assert all(r >= 1 for r in refused)
    assert admission.in_flight == 0


async def test_waiting_too_long_is_a_429():
    admission = Admission(max_in_flight=1, max_queue=1, queue_timeout=0.05)
    await admission.enter()
    with pytest.raises(RateLimited, match="waited"):
        await admission.enter()
    assert admission.queued == 0
    admission.leave()
    assert admission.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_line():
    admission = Admission(max_in_flight=1, max_queue=5, queue_timeout=5)
    await admission.enter()
    waiter = asyncio.create_task(admission.enter())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.queued == 0
    admission.leave()
    assert admission.in_flight == 0


async def test_no_limit_admits_everyone():
    admission = Admission(max_in_flight=None)
    for _ in range(100):
        await admission.enter()
    assert admission.in_flight == 100


def test_rate_limited_response_has_retry_after_and_openai_shape():
    response = RateLimited("busy", retry_after=7).response()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert b'"type":"rate_limit_error"' in response.body


async def test_a_raised_limit_admits_from_the_line_at_once():
    """1. max_in_flight 1, held, two waiting; 2. a reload raises it to 2: one of them enters
    at once, not when the held request ends; 3. lowered to 1: nobody is cut off, the next end
    does not hand its slot on."""
    admission = Admission(max_in_flight=1, max_queue=5, queue_timeout=5)
    await admission.enter()
    waiters = [asyncio.create_task(admission.enter()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert (admission.in_flight, admission.queued) == (1, 2)
    admission.configure(2, 5, 5)
    await asyncio.sleep(0.01)
    assert (admission.in_flight, admission.queued) == (2, 1)
    admission.configure(1, 5, 5)
    admission.leave()
    assert (admission.in_flight, admission.queued) == (1, 1)
    admission.leave()
    await asyncio.gather(*waiters)
    assert (admission.in_flight, admission.queued) == (1, 0)
    admission.leave()
    assert admission.in_flight == 0
