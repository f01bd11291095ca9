"""Stopping a gateway ends every engine process it started: politely on SIGTERM, at once when
the gateway itself is SIGKILLed (the guards notice their parent's death)."""

import signal
import subprocess
import time

import pytest
from fakes.gateway_process import wait_gone

# After the grace period the gateway SIGKILLs an engine's tree itself; allow for that and for
# uvicorn's own shutdown on top.
STOP_MARGIN = 15.0
CRASH_CLEANUP_SECONDS = 10.0


def _describe(members) -> str:
    return "\n".join(f"  {m.pid} {m.cmdline}" for m in members)


def _assert_engines_in(members, count: int) -> None:
    guards = [m for m in members if "backends.guard" in m.cmdline]
    cores = [m for m in members if "EngineCore" in m.cmdline]
    assert len(guards) == count and len(cores) == count, _describe(members)


@pytest.mark.e2e
def test_sigkill_of_the_gateway_takes_the_engines_with_it(start_gateway, timings):
    gw = start_gateway(("solo", 1))
    timings("own gateway start -> ready (solo)", gw.wait_ready())
    members = gw.snapshot()
    _assert_engines_in(members, 1)

    killed = time.monotonic()
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    left = wait_gone(members, CRASH_CLEANUP_SECONDS)

    message = f"still running {CRASH_CLEANUP_SECONDS:.0f} s after the gateway's kill -9"
    assert left == [], f"{message}:\n{_describe(left)}"
    timings("gateway kill -9 -> every engine process gone", time.monotonic() - killed)


@pytest.mark.e2e
@pytest.mark.e2e_ends_gateway
def test_sigterm_stops_the_gateway_and_every_engine(running_gateway, timings):
    gw = running_gateway
    members = gw.snapshot()
    _assert_engines_in(members, 2)

    signalled = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    limit = gw.stop_grace + STOP_MARGIN
    try:
        code = gw.proc.wait(limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway still running {limit:.0f} s after SIGTERM\n{gw.logs()}")
    left = wait_gone(members, max(0.0, limit - (time.monotonic() - signalled)))

    assert left == [], f"still running {limit:.0f} s after SIGTERM:\n{_describe(left)}"
    timings("shared gateway SIGTERM -> gateway and engines gone", time.monotonic() - signalled)
    # A clean stop: status 0, or death by the SIGTERM that uvicorn re-raises when it is done.
    assert code in (0, -signal.SIGTERM), f"gateway exited with {code}\n{gw.logs()}"
    assert list((gw.state_dir / "workers").glob("*.json")) == [], "pid records left behind"
    assert "Traceback" not in gw.log_path.read_text(), gw.logs()
