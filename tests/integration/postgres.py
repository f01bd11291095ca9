"""A real PostgreSQL server for the tests, in a folder of its own, on a free port.

Debian's package (`postgresql`, installed by deploy/test.sh) provides initdb and pg_ctl under
/usr/lib/postgresql/VERSION/bin. PostgreSQL refuses to run as root, so under root the server
runs as the package's `postgres` user. Every server started is stopped at teardown.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from .servers import free_port

USER = "eg"


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class Postgres:
    def __init__(self, bins: Path) -> None:
        self.bins = bins
        self.port = free_port()
        # Not under pytest's tmp_path: its folders are private to root, and the server may
        # run as another user.
        self.root = Path(tempfile.mkdtemp(prefix="eg-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", options)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `immediate` is a crash, as far as the clients can tell."""
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode, check=False)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.dsn(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bins / tool), *args], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
