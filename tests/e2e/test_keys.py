"""Keys as records in front of a real vLLM CPU engine (the shared gateway: `tiny`, `tiny-tp2`).

A key made with `enginegate keys create` (an allow-list and a daily token budget) is enforced
on the OpenAI SDK's requests, and its usage is the engine's own token counts.
"""

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from .conftest import ADMIN_KEY, GatewayProcess

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8
ALWAYS_FULL = {"ignore_eos": True}  # vLLM: a random model always writes max_tokens
# Each request reserves its body's length / 4 plus max_tokens (≈ 30 + 8) and uses the engine's
# prompt tokens plus 8: a budget of 150 lets a few through, then refuses.
BUDGET = 150
TOTALS = ("requests", "prompt_tokens", "completion_tokens")
IN_FORCE = 2.0  # seconds; a key change applies within a second


def within(seconds: float, check: Callable[[], Any]) -> Any:
    """Poll `check` until it returns something truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"not true within {seconds} s"
            return result
        time.sleep(0.1)


def ask(sdk: openai.OpenAI, model: str = "tiny") -> Any:
    return sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something about the sea."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS_FULL,
    )


def usage_rows(gateway: GatewayProcess, key: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{gateway.url}/admin/usage",
        params={"key": key},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


def test_a_created_key_is_enforced_in_front_of_the_engine(running_gateway):
    """1. `enginegate keys create` makes a key for `tiny` only, with a daily token budget;
    2. within a second the SDK may use it: /v1/models lists `tiny` alone, `tiny` answers;
    3. `tiny-tp2` is a 403 naming the model; 4. /admin/usage and `enginegate usage` show the
    engine's token counts; 5. requests until the budget is spent: then 429, Retry-After,
    `insufficient_quota` naming tokens_per_day, and the engine is not asked."""
    gw = running_gateway
    made = gw.cli(
        "keys", "create", "e2e-tenant", "--models", "tiny", "--tokens-per-day", str(BUDGET)
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-eg-")

    with gw.client(api_key=secret) as sdk:

        def listed() -> list[str] | None:
            try:
                return [m.id for m in sdk.models.list()]
            except openai.AuthenticationError:
                return None  # not in force yet

        assert within(IN_FORCE, listed) == ["tiny"]
        reply = ask(sdk)
        assert reply.model == "tiny" and reply.usage.completion_tokens == MAX_TOKENS
        prompt = reply.usage.prompt_tokens
        assert prompt > 0

        with pytest.raises(openai.PermissionDeniedError) as refused:
            ask(sdk, "tiny-tp2")
        assert refused.value.status_code == 403
        assert "tiny-tp2" in refused.value.message

        def totals() -> list[int]:
            rows = usage_rows(gw, "e2e-tenant")  # one row a day and model
            assert {row["model"] for row in rows} <= {"tiny"}
            return [sum(row[n] for row in rows) for n in TOTALS]

        within(IN_FORCE, lambda: totals() == [1, prompt, MAX_TOKENS])
        printed = gw.cli("usage", "--key", "e2e-tenant")
        assert printed.returncode == 0, printed.stderr
        assert "e2e-tenant" in printed.stdout and "tiny" in printed.stdout

        answered = 1
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(BUDGET // MAX_TOKENS):
                ask(sdk)
                answered += 1
        error = limited.value
        assert error.status_code == 429 and int(error.response.headers["retry-after"]) >= 1
        assert error.code == "insufficient_quota"
        assert f"tokens_per_day {BUDGET}" in error.message
        # the budget counts what the engine reported, not the estimates
        spent = re.search(r"\((\d+) used, 0 reserved, this request may take (\d+)\)", error.message)
        assert spent, error.message
        used, estimate = int(spent[1]), int(spent[2])
        assert answered >= 2 and used == answered * (prompt + MAX_TOKENS)
        assert used <= BUDGET < used + estimate

    # the refused requests reached no engine and are not counted
    within(IN_FORCE, lambda: totals() == [answered, answered * prompt, answered * MAX_TOKENS])
