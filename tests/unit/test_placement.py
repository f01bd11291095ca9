"""Placement: GPU blocks of tp*pp, explicit GPUs honoured, CPU core lists per rank."""

from typing import Any

import pytest

from backends.placement import PlacementError, plan, worker_id
from backends.spec import ModelSpec


def vllm(name: str, **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": name, "backend": "vllm", "model": f"/models/{name}", **fields})


def devices(slots: list) -> dict[str, tuple]:
    return {s.worker_id: s.gpus or s.cpu_ranks for s in slots}


def test_auto_gpus_come_in_blocks_of_tp_times_pp_lowest_first() -> None:
    slots = plan([vllm("a", tp=2), vllm("b", pp=2), vllm("c")], 8, [0])
    assert devices(slots) == {"a-0": (0, 1), "b-0": (2, 3), "c-0": (4,)}


def test_explicit_gpus_are_honoured_and_skipped_by_auto_models() -> None:
    models = [vllm("auto", tp=2), vllm("pinned", tp=2, gpus=[0, 1]), vllm("single")]
    slots = plan(models, 5, [0])
    assert devices(slots) == {"auto-0": (2, 3), "pinned-0": (0, 1), "single-0": (4,)}


def test_explicit_gpus_are_split_per_replica_in_the_listed_order() -> None:
    slots = plan([vllm("m", tp=2, replicas=2, gpus=[3, 2, 1, 0])], 4, [0])
    assert devices(slots) == {"m-0": (3, 2), "m-1": (1, 0)}


def test_four_gpus_one_tp2_pp2_replica() -> None:
    (slot,) = plan([vllm("m", tp=2, pp=2)], 4, [0])
    assert (slot.worker_id, slot.replica, slot.gpus) == ("m-0", 0, (0, 1, 2, 3))


def test_four_gpus_two_tp2_replicas() -> None:
    first, second = plan([vllm("m", tp=2, replicas=2)], 4, [0])
    assert (first.worker_id, first.replica, first.gpus) == ("m-0", 0, (0, 1))
    assert (second.worker_id, second.replica, second.gpus) == ("m-1", 1, (2, 3))


def test_not_enough_gpus_says_how_many_are_needed_and_left() -> None:
    with pytest.raises(PlacementError) as caught:
        plan([vllm("small", gpus=[0]), vllm("big", tp=2, replicas=2)], 4, [0])
    assert caught.value.path == "models[1]"
    assert str(caught.value) == (
        "models[1]: replica 1 of 'big' needs tp*pp = 2 GPUs, 1 left unassigned "
        "(this machine has 4: 0..3)"
    )


def test_no_gpu_at_all_suggests_the_cpu() -> None:
    with pytest.raises(PlacementError, match="no NVIDIA GPU found.*device: cpu"):
        plan([vllm("m")], 0, [0, 1])


def test_cpu_cores_are_split_between_ranks() -> None:
    models = [vllm("a", device="cpu", tp=2), vllm("b", device="cpu")]
    slots = plan(models, 0, [0, 1, 2, 3, 4, 5])
    assert devices(slots) == {"a-0": ("0-1", "2-3"), "b-0": ("4-5",)}


def test_cpu_cores_are_shared_when_ranks_outnumber_them() -> None:
    slots = plan([vllm("a", device="cpu", tp=2), vllm("b", device="cpu")], 0, [0, 1])
    assert devices(slots) == {"a-0": ("0", "1"), "b-0": ("0",)}


def test_cpu_core_lists_keep_gaps_in_the_affinity_mask() -> None:
    (slot,) = plan([vllm("a", device="cpu")], 0, [0, 2, 4])
    assert slot.cpu_ranks == ("0,2,4",)


def test_external_models_hold_no_devices_and_do_not_count_as_ranks() -> None:
    external = ModelSpec(name="ext", backend="external", url="http://h/v1", replicas=2)
    slots = plan([external, vllm("c", device="cpu")], 0, [0, 1])
    assert devices(slots) == {"ext-0": (), "ext-1": (), "c-0": ("0-1",)}


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(PlacementError) as caught:
        plan([vllm("m", device="cpu"), vllm("m", device="cpu")], 0, [0])
    assert caught.value.path == "models[1].name"


def test_worker_ids_are_safe_file_names() -> None:
    """Finding 17: worker ids were `<name>-<n>` verbatim, so `/` and `..` in a model name
    made paths; Hugging Face names are allowed and common."""
    slots = plan([vllm("deepseek-ai/DeepSeek-R1"), vllm("../../etc/x")], 2, [0])
    assert [s.worker_id for s in slots] == ["deepseek-ai--DeepSeek-R1-0", "..--..--etc--x-0"]
    assert worker_id("a b\x00c", 3) == "a_b_c-3"
    for slot in slots:
        assert "/" not in slot.worker_id and slot.worker_id not in (".", "..")


def test_names_whose_worker_ids_would_collide_are_refused() -> None:
    """Finding 17: `a/b` and `a--b` would share one log file and pid record."""
    with pytest.raises(PlacementError, match=r"models\[1\]\.name: 'a--b' and 'a/b'"):
        plan([vllm("a/b"), vllm("a--b")], 2, [0])
