"""The config of models on demand: durations, what needs `start: on_demand`, sleep mode only
where the engine has it, and exclusive groups sharing GPUs."""

from typing import Any

import pytest
from pydantic import ValidationError

from backends.placement import PlacementError, plan
from backends.spec import ModelSpec
from backends.vllm import VllmAdapter


def spec(**fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": "m", "backend": "vllm", "model": "/models/m", **fields})


@pytest.mark.parametrize(
    ("given", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400)]
)
def test_idle_stop_takes_seconds_or_a_duration(given: object, seconds: float) -> None:
    assert spec(start="on_demand", idle_stop=given).idle_stop == seconds


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"start": "on_demand", "idle_stop": "ten minutes"}, "a duration such as 90s, 10m, 1h"),
        ({"idle_stop": 60}, "idle_stop is for `start: on_demand` models"),
        ({"exclusive": "g"}, "exclusive is for `start: on_demand` models"),
        ({"start": "on_demand", "idle_action": "sleep", "device": "cpu"},
         "idle_action: sleep needs vLLM on GPU"),
    ],
)  # fmt: skip
def test_on_demand_keys_refused_where_they_cannot_work(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        spec(**fields)


def test_an_external_model_cannot_start_on_demand() -> None:
    with pytest.raises(ValidationError, match="cannot start on demand"):
        ModelSpec(name="x", backend="external", url="http://h/v1", start="on_demand")


def test_sleep_mode_turns_on_the_engine_flag_and_its_routes() -> None:
    model = spec(start="on_demand", idle_action="sleep", idle_stop="10m")
    (slot,) = plan([model], 1, [0])
    launch = VllmAdapter().launch(slot, 0, "k", socket_path="/s.sock")
    assert "--enable-sleep-mode" in launch.argv
    assert launch.env["VLLM_SERVER_DEV_MODE"] == "1"
    (plain,) = plan([spec()], 1, [0])
    assert "--enable-sleep-mode" not in VllmAdapter().launch(plain, 0, "k", socket_path="/s").argv


def test_an_exclusive_group_may_share_gpus_and_no_one_else() -> None:
    a = spec(name="a", gpus=[0], start="on_demand", exclusive="g")
    b = spec(name="b", gpus=[0], start="on_demand", exclusive="g")
    assert [slot.gpus for slot in plan([a, b], 1, [0])] == [(0,), (0,)]
    c = spec(name="c", gpus=[0], start="on_demand", exclusive="other")
    with pytest.raises(PlacementError, match="GPU 0 is already given to models"):
        plan([a, c], 1, [0])
