"""The overhead benchmark's smoke mode runs end to end, so the benchmark cannot rot.

It starts real processes (the bench upstream and `python -m gateway serve`) for ~30 s; the
figures it prints are not checked against any goal here, only that they exist and that no
request failed.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[+-]?\d[\d,]*(\.\d+)?")


def test_smoke_prints_a_table_with_numbers_for_both_contenders(tmp_path: Path) -> None:
    """1. Run `python -m bench.overhead --smoke`; 2. read its table and JSON; 3. check both."""
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| direct ") or line.startswith("| enginegate ")
    }
    assert set(rows) == {"direct", "enginegate"}, done.stdout
    enginegate_cells = [
        line.split("|")[2:-1]
        for line in done.stdout.splitlines()
        if line.startswith("| enginegate ")
    ]
    for cells in enginegate_cells:  # latency row and throughput row
        assert all(NUMBER.search(cell) for cell in cells[:3]), cells
    report = json.loads(out.read_text())
    for name in ("direct", "enginegate"):
        result = report["contenders"][name]
        assert result["status"] == "ok", result
        assert result["max_rps"] > 0
        for kind in ("plain", "stream"):
            for phase in result[kind].values():
                assert phase["errors"] == 0, (name, kind, phase["error_samples"])
                assert phase["completed"] > 0, (name, kind, phase)
        streams = result["stream"].values()
        assert all(phase["chunks_per_s"] > 0 for phase in streams)
    gateway = report["contenders"]["enginegate"]
    assert gateway["cpu_s_per_1k"] > 0 and gateway["idle_rss_mb"] > 0
    assert gateway["hold"]["open"] == gateway["hold"]["wanted"], gateway["hold"]
