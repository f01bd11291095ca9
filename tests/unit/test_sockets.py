"""Where a vLLM worker's Unix socket goes: state_dir/run/, private, and a private temporary
directory when that path would pass the 107 bytes a socket path may hold."""

import os
import stat
import tempfile
from pathlib import Path

import httpx
import pytest

from backends.base import Slot
from backends.ports import PortAllocator
from backends.sockets import MAX_PATH, WorkerSocket, socket_name
from backends.spec import ModelSpec
from backends.supervisor import Worker


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def long_dir(base: Path) -> Path:
    """A state_dir under `base` whose run/<name> path cannot be a socket's."""
    path = base / ("d" * 60) / ("e" * 60)
    assert len(str(path / "run" / "tiny-0.sock")) > MAX_PATH
    return path


def test_short_ids_name_the_socket_and_long_ones_are_hashed_apart() -> None:
    assert socket_name("tiny-0") == "tiny-0.sock"
    first = socket_name("a-model-with-a-very-long-name-0")
    second = socket_name("a-model-with-a-very-long-name-1")
    assert first != second and len(first) < 40 and len(second) < 40
    assert first.startswith("a-model-~")  # `~` is in no worker id: no hash equals an id
    assert socket_name("x" * 24) == "x" * 24 + ".sock"


def test_the_socket_goes_to_state_dir_run_which_is_made_private(tmp_path: Path) -> None:
    """An existing run/ directory that others may enter is made 0700 again; a socket file
    left by an engine that died is removed (binding would fail on it)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    (run / "tiny-0.sock").write_text("left by a dead engine")
    place = WorkerSocket(tmp_path, "tiny-0")
    assert place.planned == str(run / "tiny-0.sock")
    path = place.prepare()
    assert path == run / "tiny-0.sock" and not path.exists()
    assert mode(run) == 0o700
    path.write_text("the engine's socket")
    place.remove()
    assert not path.exists() and run.is_dir()  # run/ is the state_dir's, shared by workers
    place.remove()  # any number of times


def test_a_too_long_path_falls_back_to_a_private_temporary_directory(tmp_path: Path) -> None:
    place = WorkerSocket(long_dir(tmp_path), "tiny-0")
    assert place.planned.endswith("/enginegate-XXXXXXXX/tiny-0.sock")
    path = place.prepare()
    assert len(os.fsencode(path)) <= MAX_PATH
    assert path.parent.name.startswith("enginegate-") and path.name == "tiny-0.sock"
    assert path.parent.parent == Path(tempfile.gettempdir())
    assert mode(path.parent) == 0o700
    assert place.prepare() == path  # the same path for every start of the worker
    path.write_text("the engine's socket")
    place.remove()
    assert not path.parent.exists()


def test_no_short_enough_temporary_directory_is_an_error_that_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = long_dir(tmp_path) / "tmp"
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ValueError, match="TMPDIR is too long"):
        WorkerSocket(long_dir(tmp_path), "tiny-0").prepare()
    assert list(deep.iterdir()) == []


async def test_a_vllm_worker_gets_a_socket_and_no_port(tmp_path: Path) -> None:
    spec = ModelSpec(name="tiny", backend="vllm", model="/m", device="cpu")
    slot = Slot("tiny-0", spec, 0, cpu_ranks=("0",))
    async with httpx.AsyncClient() as shared:
        worker = Worker(slot, PortAllocator(), shared, tmp_path)
        worker.launch = launch = worker.plan_launch()
        socket_path = str(tmp_path / "run" / "tiny-0.sock")
        assert worker.port is None and worker.side_ports == ()
        assert launch.socket_path == worker.socket_path == socket_path
        assert launch.argv[launch.argv.index("--uds") + 1] == socket_path
        assert worker.view().socket == socket_path and worker.view().port is None
        assert worker.client is not shared  # probes and scrapes go through the socket
        await worker.stop()
        assert worker.client is shared


async def test_an_sglang_worker_keeps_its_loopback_port(tmp_path: Path) -> None:
    """SGLang's key guards every route but /health* and /metrics: it stays on TCP."""
    spec = ModelSpec(name="big", backend="sglang", model="/m")
    async with httpx.AsyncClient() as shared:
        worker = Worker(Slot("big-0", spec, 0, gpus=(0,)), PortAllocator(), shared, tmp_path)
        worker.launch = launch = worker.plan_launch()
        assert worker.port is not None and launch.socket_path is None
        assert launch.base_url == f"http://127.0.0.1:{worker.port}/v1"
        assert worker.client is shared and not (tmp_path / "run").exists()
        await worker.stop()
