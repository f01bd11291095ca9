"""`enginegate plan` (and the same check in `check`/`serve`) against simulated GPU inventories.

Inventories come from JSON files (`--inventory`), the way a user plans for a machine they are
not on, or from stand-ins for NVML and nvidia-smi; nothing here needs a GPU.
"""

import json
import os
from pathlib import Path
from typing import Any

import pytest

from backends.adapters import ADAPTERS
from backends.fit import Fit, check
from backends.gpus import MIB, Gpu, Inventory, inventory_from_json, read_inventory
from backends.placement import plan
from backends.spec import ModelSpec
from gateway.cli import main

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
SEED = EXAMPLES / "seed-000-8gpu.yaml"
H200X8 = EXAMPLES / "inventory-8xh200.json"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example reads the gateway's key from the environment, as `serve` would."""
    monkeypatch.setenv("ENGINEGATE_API_KEY", "test-key")
    for name in ("R1_DIR", "R1_DISTILL_DIR"):
        monkeypatch.delenv(name, raising=False)


def inventory(tmp_path: Path, total_mib: int, free_mib: int, count: int = 8) -> Path:
    path = tmp_path / "gpus.json"
    gpu = {"name": "GPU", "total_mib": total_mib, "free_mib": free_mib, "count": count}
    path.write_text(json.dumps([gpu]))
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err + ("" if code in (0, 1) else str(code))


def config(tmp_path: Path, models: str) -> Path:
    path = tmp_path / "enginegate.yaml"
    path.write_text("gateway: {allow_unauthenticated: true}\nmodels:\n" + models)
    return path


@pytest.mark.parametrize(
    ("only", "engine", "gpus", "weights", "budget", "tokens"),
    [
        ("r1-sglang", "sglang", "0-7", "78.3 GiB 8-bit", "124.4 GiB", "695,149"),
        ("r1-lmdeploy", "lmdeploy", "0-7", "78.3 GiB 8-bit", "139.8 GiB", "727,324"),
        ("r1-distill", "vllm", "0-3", "1.7 GiB float32", "129.2 GiB", "9,400,799"),
    ],
)
def test_seed_example_fits_on_8_h200_one_alternative_at_a_time(
    only: str,
    engine: str,
    gpus: str,
    weights: str,
    budget: str,
    tokens: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(
        ["plan", "-c", str(SEED), "--only", only, "--inventory", str(H200X8)], capsys
    )
    assert (code, err) == (0, "")
    assert "8 x NVIDIA H200 (140.4 GiB, GPUs 0-7), 139.8 GiB free each" in out
    (row,) = [line.split("  ") for line in out.splitlines() if line.startswith(f"{only}-0 ")]
    cells = [cell.strip() for cell in row if cell.strip()]
    assert cells[:4] == [f"{only}-0", engine, gpus, weights]
    assert cells[-3:] == [budget, tokens, "yes"]


def test_seed_example_as_a_whole_needs_20_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["plan", "-c", str(SEED), "--inventory", str(H200X8)], capsys)
    assert (code, out) == (1, "")
    assert "models[1]: replica 0 of 'r1-lmdeploy' needs tp*pp = 8 GPUs, 0 left" in err
    assert "need 20 GPUs together (r1-sglang 8, r1-lmdeploy 8, r1-distill 4)" in err
    assert "this machine has 8; plan alternatives one at a time with --only NAME" in err


def test_json_output_for_the_seed_question(capsys: pytest.CaptureFixture[str]) -> None:
    """How much GPU memory does R1-Distill-Qwen-1.5B need with TP2 x PP2 (float32)?"""
    argv = ["plan", "-c", str(SEED), "--only", "r1-distill", "--inventory", str(H200X8), "--json"]
    code, out, _ = run(argv, capsys)
    document = json.loads(out)
    assert (code, document["fits"]) == (0, True)
    assert len(document["inventory"]["gpus"]) == 8
    (worker,) = document["workers"]
    assert worker["gpus"] == [0, 1, 2, 3]
    assert worker["weights_bytes"] == 1_777_088_000
    assert worker["kv_per_token_bytes"] == 14_336
    assert worker["needed_bytes"] == 1_777_088_000 + 2 * 1024**3 + 14_336 * 131_072
    assert worker["budget_rule"] == "0.92 x total 140.4 GiB"


def test_r1_on_80_gb_gpus_is_refused_with_the_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpus = inventory(tmp_path, total_mib=81559, free_mib=81000)
    code, out, err = run(
        ["plan", "-c", str(SEED), "--only", "r1-sglang", "--inventory", str(gpus)], capsys
    )
    assert code == 1
    assert "NO" in out.splitlines()[3]
    assert "r1-sglang-0: DOES NOT FIT: KV room 0.0 GiB < one full context" in out
    assert (
        "models[0] (r1-sglang-0 on GPUs 0-7): does not fit: KV room 0.0 GiB < one full context: "
        "163840 tokens x 70272 B = 10.7 GiB" in err
    )


def test_vllm_is_refused_when_its_share_of_total_is_not_free(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = inventory(tmp_path, total_mib=81559, free_mib=40000, count=4)
    code, _, err = run(
        ["check", "-c", str(SEED), "--only", "r1-distill", "--inventory", str(busy)], capsys
    )
    assert code == 1
    # the key path is the model's place in the file, not in the --only selection
    assert "models[2] (r1-distill-0 on GPUs 0-3): does not fit: 0.92 x total 79.6 GiB = " in err
    assert "= 73.3 GiB > free 39.1 GiB" in err


def test_lmdeploy_is_refused_when_weights_exceed_free_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = inventory(tmp_path, total_mib=81559, free_mib=70000)
    argv = ["plan", "-c", str(SEED), "--only", "r1-lmdeploy", "--inventory", str(small), "--json"]
    code, out, err = run(argv, capsys)
    assert (code, json.loads(out)["fits"]) == (1, False)
    assert "weights + overhead 80.3 GiB > free 68.4 GiB" in err


def test_gpu_workers_on_a_machine_without_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    none = tmp_path / "none.json"
    none.write_text("[]")
    code, _, err = run(
        ["plan", "-c", str(SEED), "--only", "r1-distill", "--inventory", str(none)], capsys
    )
    assert code == 1
    assert "no NVIDIA GPU found on this machine; use device: cpu" in err
    assert f"GPUs: none in {none}" in err


def test_cpu_only_config_plans_without_asking_for_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "  - {name: tiny, backend: vllm, model: /m, device: cpu}\n")
    code, out, err = run(["plan", "-c", str(path)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("GPUs: none (no model asks for GPUs)")
    assert "cpu: KV cache 1 GiB of RAM" in out


def test_hub_id_without_config_json_is_unknown_not_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "  - {name: r1, backend: sglang, model: deepseek-ai/DeepSeek-R1}\n")
    gpus = inventory(tmp_path, total_mib=81559, free_mib=81000, count=1)
    code, out, _ = run(["plan", "-c", str(path), "--inventory", str(gpus)], capsys)
    assert code == 0
    assert "unknown (config.json not found)" in out


def test_only_names_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        ["plan", "-c", str(SEED), "--only", "r2", "--inventory", str(H200X8)], capsys
    )
    assert code == 1
    assert "--only r2: no such model (have r1-distill, r1-lmdeploy, r1-sglang)" in err


def test_bad_inventory_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "gpus.json"
    bad.write_text('[{"name": "H200"}]')
    code, _, err = run(["plan", "-c", str(SEED), "--inventory", str(bad)], capsys)
    assert code == 1
    assert f"{bad}: GPU inventory: [0]: needs total_mib" in err


def test_inventory_file_repeats_counted_entries_with_their_own_indices() -> None:
    text = '[{"total_mib": 100, "count": 2}, {"name": "B", "total_mib": 50, "free_mib": 10}]'
    assert inventory_from_json(text, "f").gpus == (
        Gpu(0, "GPU", 100 * MIB, 100 * MIB),
        Gpu(1, "GPU", 100 * MIB, 100 * MIB),
        Gpu(2, "B", 50 * MIB, 10 * MIB),
    )


class FakeNvml:
    """The few pynvml calls read_inventory makes, for two GPUs."""

    class Memory:
        def __init__(self, total: int, free: int) -> None:
            self.total, self.free = total, free

    def __init__(self) -> None:
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return self.Memory(80 * 1024**3, (70 - handle) * 1024**3)

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        return b"NVIDIA H100" if handle == 0 else "NVIDIA H100"


def test_nvml_inventory() -> None:
    nvml = FakeNvml()
    found = read_inventory(nvml)
    assert found == Inventory(
        (
            Gpu(0, "NVIDIA H100", 80 * 1024**3, 70 * 1024**3),
            Gpu(1, "NVIDIA H100", 80 * 1024**3, 69 * 1024**3),
        ),
        "NVML",
    )
    assert nvml.calls == ["init", "shutdown"]


class BrokenNvml:
    def nvmlInit(self) -> None:
        raise RuntimeError("Driver Not Loaded")


def test_without_nvml_nvidia_smi_is_asked(tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho '0, NVIDIA H200, 143771, 143000'\necho '1, NVIDIA H200, 143771, 1000'\n"
    )
    os.chmod(smi, 0o755)
    found = read_inventory(BrokenNvml(), nvidia_smi=str(smi))
    assert found.source == "nvidia-smi"
    assert [(g.index, g.free_bytes // MIB) for g in found.gpus] == [(0, 143000), (1, 1000)]


def test_no_nvml_and_no_nvidia_smi_says_why() -> None:
    found = read_inventory(BrokenNvml(), nvidia_smi=None)
    assert found.gpus == ()
    assert (
        found.note == "no NVIDIA GPU found (NVML: RuntimeError: Driver Not Loaded; no nvidia-smi)"
    )


def sglang_fit(free_mib: int, **fields: Any) -> Fit:
    spec = ModelSpec(
        name="r1", backend="sglang", model="x", config_json="DeepSeek-R1.json", tp=8, **fields
    )
    gpus = tuple(Gpu(i, "H200", 143771 * MIB, free_mib * MIB) for i in range(8))
    (fit,) = check(
        plan([spec], 8, [0]), Inventory(gpus, "test"), EXAMPLES / "model-configs", ADAPTERS
    )
    return fit


def test_sglang_auto_fraction_on_h200_tp8_mla() -> None:
    # reserve = 512 + 1.5 * 8192 (prefill chunk) + 8/8 * 1024 + 2 * 512 (graphs) + 1536 (MLA)
    #         = 16384 MiB; fraction = round((143771 - 16384) / 143771, 3) = 0.886
    fit = sglang_fit(143771)
    assert fit.budget_rule == "auto 0.886 x total 140.4 GiB"
    assert fit.budget == int(0.886 * 143771 * MIB)
    assert fit.kv_room == fit.budget - 84_109_970_304


def test_sglang_kv_cache_shrinks_by_what_other_processes_hold() -> None:
    roomy, crowded = sglang_fit(143771), sglang_fit(143771 - 40 * 1024)
    assert roomy.kv_room is not None and crowded.kv_room is not None
    assert roomy.kv_room - crowded.kv_room == 40 * 1024 * MIB
    # 46.1 GiB of KV room on an idle GPU, 6.1 GiB with 40 GiB taken: less than one context
    assert (roomy.fits, crowded.fits) == (True, False)
    assert crowded.problem.startswith("KV room 6.1 GiB < one full context: 163840 tokens")


def test_sglang_explicit_fraction_is_used_as_given() -> None:
    fit = sglang_fit(143771, engine_args={"mem-fraction-static": 0.6})
    assert fit.budget_rule == "0.6 x total 140.4 GiB"
    assert fit.fits is False  # 0.6 x 140.4 = 84.2 GiB, less 78.3 GiB of weights: 5.9 GiB of KV
