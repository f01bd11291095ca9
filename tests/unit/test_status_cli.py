"""`enginegate status`: the tables it prints, where it looks for the gateway, how it fails."""

import socket

import pytest

from gateway.cli import main
from gateway.config import Config
from gateway.status import base_url, duration, render

STATUS = {
    "version": "0.1.0",
    "uptime_seconds": 3725.0,
    "time": 1_800_000_000.0,
    "models": [
        {"name": "tiny", "backend": "vllm", "tp": 2, "pp": 1, "replicas": 2, "replicas_ready": 1}
    ],
    "workers": [
        {
            "id": "tiny-0", "model": "tiny", "state": "ready", "devices": "gpu 0,1",
            "port": 41001, "pid": 4242, "uptime_seconds": 65.0, "restarts": 0,
            "last_start_seconds": 41.25, "in_flight": 3, "last_error": [],
            "log": "/admin/workers/tiny-0/log",
        },
        {
            "id": "tiny-1", "model": "tiny", "state": "failed", "devices": "gpu 2,3",
            "port": None, "pid": None, "uptime_seconds": None, "restarts": 5,
            "last_start_seconds": None, "in_flight": 0,
            "last_error": [f"line {i}" for i in range(30)] + ["torch.OutOfMemoryError: CUDA"],
            "log": "/admin/workers/tiny-1/log",
        },
    ],
    "gpus": [
        {"index": 0, "name": "NVIDIA H100", "uuid": "GPU-0", "used_bytes": 2**34,
         "total_bytes": 80 * 2**30},
    ],
    "totals": {
        "requests": {"tiny": 12.0}, "errors": {"tiny": 2.0}, "prompt_tokens": {"tiny": 100.0},
        "completion_tokens": {"tiny": 50.0}, "in_flight": {"tiny": 3.0},
    },
}  # fmt: skip


def test_render_prints_models_workers_gpus_and_last_errors() -> None:
    lines = render(STATUS, "http://127.0.0.1:8000").splitlines()
    assert lines[0] == "enginegate 0.1.0 at http://127.0.0.1:8000, up 1h2m"
    assert lines[2].split() == [
        "MODEL", "BACKEND", "TPxPP", "READY", "REQUESTS", "ERRORS", "TOKENS", "IN", "FLIGHT",
        "QUEUED",
    ]  # fmt: skip
    assert lines[3].split() == ["tiny", "vllm", "2x1", "1/2", "12", "2", "150", "3", "0"]
    workers = [line.split() for line in lines if line.startswith("tiny-")]
    assert workers[0] == ["tiny-0", "tiny", "ready", "gpu", "0,1", "41001", "4242", "1m5s", "0",
                          "41.2s", "3"]  # fmt: skip
    assert workers[1] == ["tiny-1", "tiny", "failed", "gpu", "2,3", "-", "-", "-", "5", "-", "0"]
    assert any(line.split()[:3] == ["0", "NVIDIA", "H100"] and "16.0 / 80.0 GiB" in line
               for line in lines)  # fmt: skip
    error_at = lines.index("last error lines of tiny-1 (/admin/workers/tiny-1/log):")
    assert lines[error_at + 1 :] == [f"  line {i}" for i in range(26, 30)] + [
        "  torch.OutOfMemoryError: CUDA"
    ]


def test_columns_line_up() -> None:
    lines = render(STATUS, "http://gw").splitlines()
    header = next(line for line in lines if line.startswith("WORKER"))
    rows = [line for line in lines if line.startswith("tiny-")]
    # Right-aligned numbers end where their header ends.
    end = header.index("RESTARTS") + len("RESTARTS")
    assert [row[end - 1] for row in rows] == ["0", "5"]


def test_a_worker_on_a_unix_socket_shows_unix_for_its_port() -> None:
    """vLLM workers listen on a Unix socket and no port (finding 19)."""
    socket_worker = {**STATUS["workers"][0], "port": None, "socket": "/state/run/tiny-0.sock"}
    lines = render({**STATUS, "workers": [socket_worker]}, "http://gw").splitlines()
    (row,) = [line.split() for line in lines if line.startswith("tiny-0")]
    assert row[5] == "unix"


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:9000"), ("0.0.0.0", "http://127.0.0.1:9000"),
     ("::", "http://[::1]:9000"), ("gw.internal", "http://gw.internal:9000")],
)  # fmt: skip
def test_the_url_comes_from_the_configs_host_and_port(host: str, url: str) -> None:
    config = Config.model_validate(
        {
            "gateway": {"host": host, "port": 9000, "allow_unauthenticated": True},
            "models": [{"name": "r", "backend": "external", "url": "http://up/v1"}],
        }
    )
    assert base_url(config) == url


@pytest.mark.parametrize(
    ("seconds", "shown"), [(None, "-"), (5.9, "5s"), (65, "1m5s"), (7200, "2h0m"), (90000, "1d1h")]
)
def test_duration(seconds: float | None, shown: str) -> None:
    assert duration(seconds) == shown


def test_an_unreachable_gateway_is_exit_status_1_with_a_message(capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(SystemExit) as exited:
            main(["status", "--url", f"http://127.0.0.1:{port}", "--timeout", "2"])
    assert exited.value.code == 1
    assert f"cannot reach the gateway at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_a_missing_config_file_says_so(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "-c", str(tmp_path / "nope.yaml")])
    assert exited.value.code == 1
    assert "nope.yaml: cannot read" in capsys.readouterr().err


def test_a_worker_being_replaced_names_its_successor() -> None:
    old = {**STATUS["workers"][0], "state": "draining", "replaced_by": "tiny-0.1"}
    new = {**STATUS["workers"][0], "id": "tiny-0.1", "state": "ready", "replaces": "tiny-0"}
    lines = render({**STATUS, "workers": [old, new]}, "http://gw").splitlines()
    (row,) = [line for line in lines if line.startswith("tiny-0 ")]
    assert "draining -> tiny-0.1" in row
