"""The reload plan: what a new config file changes, judged model by model (gateway/reload.py)."""

from typing import Any

import pytest

from backends.gpus import Gpu, Inventory
from gateway.config import Config
from gateway.reload import as_if_freed, diff, successor_id


def config(*models: dict[str, Any], **gateway: Any) -> Config:
    return Config.model_validate(
        {"gateway": {"api_keys": ["sk-1"], **gateway}, "models": list(models)}
    )


def model(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "backend": "vllm", "model": f"/models/{name}", "device": "cpu", **fields}


def test_each_model_is_kept_replaced_scaled_started_or_stopped() -> None:
    old = config(model("same"), model("flags"), model("path"), model("more"), model("gone"))
    new = config(
        model("same", aliases=["s"], max_in_flight=4, routing="prefix_affinity"),
        model("flags", engine_args={"max-num-seqs": 8}),
        model("path", model="/models/other"),
        model("more", replicas=3),
        model("new"),
    )
    plan = diff(old, new)
    assert plan.keep == ["same"]
    assert plan.replace == ["flags", "path"]
    assert plan.scale == {"more": (1, 3)}
    assert plan.start == ["new"]
    assert plan.stop == ["gone"]
    assert plan.settings == ["models[0] (same)"]


@pytest.mark.parametrize(
    "change",
    [{"tp": 2}, {"command": ["vllm", "serve"]}, {"env": {"A": "1"}}, {"kv_cache_gib": 2},
     {"reasoning": "deepseek_r1"}, {"replicas": 2, "engine_args": {"enforce-eager": True}}],
)  # fmt: skip
def test_an_engine_setting_means_new_engines(change: dict[str, Any]) -> None:
    assert diff(config(model("m")), config(model("m", **change))).replace == ["m"]


def test_gateway_settings_are_listed_and_nothing_else_changes() -> None:
    plan = diff(config(model("m")), config(model("m"), read_timeout=5, api_keys=["sk-1", "sk-2"]))
    assert plan.settings == ["gateway.api_keys", "gateway.read_timeout"]
    assert not plan.changes_engines
    assert plan.describe().splitlines() == [
        "apply    gateway.api_keys",
        "apply    gateway.read_timeout",
        "keep     m",
    ]


def test_the_same_file_changes_nothing() -> None:
    plan = diff(config(model("m")), config(model("m")))
    assert plan.describe() == "nothing changes\nkeep     m"


@pytest.mark.parametrize(
    ("old", "taken", "expected"),
    [("tiny-0", set(), "tiny-0.1"), ("tiny-0.1", set(), "tiny-0.2"),
     ("tiny-0", {"tiny-0.1"}, "tiny-0.2"), ("v1.5-0", set(), "v1.5-0.1"),
     ("v1.5-0.9", set(), "v1.5-0.10")],
)  # fmt: skip
def test_a_successor_id_counts_generations_and_never_takes_one_in_use(
    old: str, taken: set[str], expected: str
) -> None:
    assert successor_id(old, taken) == expected


def test_gpus_of_engines_being_replaced_count_as_free_for_the_fit_check() -> None:
    """A successor on the GPUs its predecessor holds starts once that one stopped, so the
    memory it holds now must not make the new file 'not fit'."""
    inventory = Inventory((Gpu(0, "H100", 80, 5), Gpu(1, "H100", 80, 6)), "NVML")
    freed = as_if_freed(inventory, {1})
    assert [(g.index, g.free_bytes) for g in freed.gpus] == [(0, 5), (1, 80)]
