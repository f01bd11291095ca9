"""The wheel holds every module and template: the Dockerfile installs it non-editable, where a
package left out of pyproject's list (gateway.routing once was) only shows at import time."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_every_module_and_template(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a clean copy: an in-tree build/ could hide what is missing
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("gateway", "backends"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("enginegate-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    sources = [
        path.relative_to(ROOT).as_posix()
        for package in ("gateway", "backends")
        for path in (ROOT / package).rglob("*")
        if path.suffix in (".py", ".html") and "__pycache__" not in path.parts
    ]
    assert "gateway/routing/least_outstanding.py" in sources
    assert [s for s in sources if s not in packed] == []
