"""Per-key limits: each refusal is a 429 naming its limit, with a Retry-After that fits it."""

import pytest

from gateway.errors import RateLimited
from gateway.keys import make_key
from gateway.quota import Quota, QuotaExceeded, estimate_tokens


def test_rpm_bursts_to_its_limit_then_refills_at_the_rate() -> None:
    quota, (key, _) = Quota(), make_key("k", rpm=2)
    quota.admit(key, 1, now=0)
    quota.admit(key, 1, now=0)
    with pytest.raises(RateLimited, match="rpm limit: 2 requests per minute") as caught:
        quota.admit(key, 1, now=1)
    assert caught.value.status == 429 and caught.value.retry_after == 29
    quota.admit(key, 1, now=31)  # half a minute: one request's worth back


def test_tpm_reserves_the_estimate_and_settles_with_usage() -> None:
    quota, (key, _) = Quota(), make_key("k", tpm=600)
    quota.admit(key, 500, now=0)
    with pytest.raises(RateLimited, match="tpm limit: 600 tokens per minute") as caught:
        quota.admit(key, 200, now=0)
    assert caught.value.retry_after == 10  # 100 missing at 10 a second
    quota.settle(key, 500, 50)  # it used far less than reserved: 450 come back at once
    quota.admit(key, 200, now=0)


def test_concurrency_counts_requests_in_flight() -> None:
    quota, (key, _) = Quota(), make_key("k", max_concurrent=1)
    quota.admit(key, 10)
    with pytest.raises(RateLimited, match="max_concurrent 1"):
        quota.admit(key, 10)
    quota.settle(key, 10, 10)
    quota.admit(key, 10)


@pytest.mark.parametrize(
    ("field", "word"), [("tokens_per_day", "daily"), ("tokens_per_month", "monthly")]
)
def test_budgets_count_the_store_local_usage_and_reservations(field: str, word: str) -> None:
    quota, (key, _) = Quota(), make_key("k", **{field: 1000})
    quota.refreshed({"k": 600}, {"k": 600})
    quota.admit(key, 300)
    with pytest.raises(QuotaExceeded, match=f"{word} budget: {field} 1000") as caught:
        quota.admit(key, 200)
    assert caught.value.code == "insufficient_quota" and caught.value.retry_after >= 1
    quota.settle(key, 300, 100)
    assert quota.used_today("k") == 700
    quota.written("k", 100)  # in the store now
    assert quota.used_today("k") == 700
    quota.refreshed({"k": 700}, {"k": 700})
    assert quota.used_this_month("k") == 700
    quota.admit(key, 300)


def test_changed_limits_apply_to_the_next_request() -> None:
    quota, (key, _) = Quota(), make_key("k", rpm=100)
    quota.admit(key, 1, now=0)
    tighter, _ = make_key("k", rpm=1)
    quota.admit(tighter, 1, now=0)  # the bucket shrank to 1
    with pytest.raises(RateLimited, match="rpm limit: 1 "):
        quota.admit(tighter, 1, now=0)
    quota.admit(make_key("k")[0], 1, now=0)  # no limit any more


def test_estimate_is_prompt_length_plus_what_may_be_written() -> None:
    assert estimate_tokens({"max_tokens": 100}, 400) == 200
    assert estimate_tokens({"max_completion_tokens": 10}, 40) == 20
    assert estimate_tokens({}, 0) == 256
