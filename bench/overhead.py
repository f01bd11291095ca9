"""What a gateway costs: every contender in front of one fast upstream, in one run, as ratios.

    python -m bench.overhead --setup           create the peers' venvs (once; minutes)
    python -m bench.overhead                   the full run (~2 min per contender)
    python -m bench.overhead --smoke           seconds: direct + enginegate, tiny counts (CI)
    python -m bench.overhead --only enginegate enginegate-keyed    what per-key checks cost

One upstream (bench/upstream.py, a load instrument) serves every contender. The contender
runs pinned to one core; the upstream and the load generator share another, so the gateway
never competes with the instrument (on a machine with 3+ cores each gets its own). Per
contender and concurrency (1, 64, 512):

- non-streaming, by wrk (C, ~3x less CPU per request than our asyncio client): latency p50/p99
  and requests/s; "max req/s" is the best of the concurrencies;
- streams, by bench/load.py: time to first token p50/p99 and chunks/s delivered (one token a
  chunk, so tokens/s is the same ratio);
- the contender's process tree from /proc: CPU seconds per 1,000 non-streaming requests (at
  the saturating concurrency), RSS idle and with 1,000 open streams, and whether the upstream
  streams close once the clients went away.

"added" is the contender's figure minus direct's at the same concurrency. The machine may be
shared and noisy: compare contenders within one run, not across runs.
"""

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import contenders as peers
from bench.contenders import Contender
from bench.procs import Cores, Process, commit, machine, pinned, run_measured, wait_ready
from bench.report import render

RESULTS = Path(__file__).resolve().parent / "results"
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk.lua"
MODEL = "tiny"


@dataclass
class Settings:
    concurrencies: tuple[int, ...] = (1, 64, 512)
    duration: float = 8  # seconds per phase
    warmup: float = 1  # seconds not counted at the start of a phase
    chunks: int = 25  # tokens per answer
    interval_ms: float = 20  # between chunks: 50 tokens/s per stream
    hold: int = 1000  # open streams for the memory figure

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(concurrencies=(1, 8), duration=1.5, warmup=0.3, chunks=5, interval_ms=5, hold=50)


class Bench:
    """One run: the upstream, then each contender in turn, measured phase by phase."""

    def __init__(
        self, settings: Settings, cores: Cores, workdir: Path, profile: Path | None = None
    ) -> None:
        self.settings = settings
        self.profile = profile  # a folder: py-spy records the contender in matching phases
        self.profile_match = "-c64"
        self.cores = cores
        self.workdir = workdir
        port = peers.free_port()
        self.upstream_url = f"http://127.0.0.1:{port}"
        argv = [
            sys.executable,
            "-m",
            "bench.upstream",
            "--port",
            str(port),
            "--chunks",
            str(settings.chunks),
            "--interval-ms",
            str(settings.interval_ms),
        ]
        self.upstream = Process("upstream", argv, {}, cores.instrument, workdir / "upstream.log")
        wait_ready(peers.direct(self.upstream_url), self.upstream, timeout=20)
        self.has_wrk = shutil.which("wrk") is not None

    def close(self) -> None:
        self.upstream.stop()

    def pace(self, chunks: int, interval_ms: float) -> None:
        config = {"chunks": chunks, "interval_ms": interval_ms}
        httpx.post(f"{self.upstream_url}/bench/config", json=config, timeout=5).raise_for_status()

    def open_upstream_streams(self) -> int:
        stats = httpx.get(f"{self.upstream_url}/bench/stats", timeout=5).json()
        return int(stats["streams"])

    def measure(self, contender: Contender) -> dict[str, Any]:
        result: dict[str, Any] = {"status": contender.status}
        if contender.status != "ok":
            return result
        process = None
        if contender.argv:
            log = self.workdir / f"{contender.name}.log"
            argv, env = contender.argv, contender.env
            process = Process(contender.name, argv, env, self.cores.gateway, log)
        try:
            result["ready_s"] = round(wait_ready(contender, process), 2)
            time.sleep(1)
            result["idle_rss_mb"] = process.rss_mb() if process else None
            self._phases(contender, process, result)
        except RuntimeError as exc:
            result["status"] = f"failed: {exc}"
        finally:
            if process is not None:
                process.stop()
        return result

    def _phases(self, contender: Contender, process: Process | None, result: dict) -> None:
        s = self.settings
        # Warm-up (connection pools, JITs, caches): longer than bench.load's own uncounted start,
        # which would leave it an empty window to divide by.
        self._plain(contender, 8, s.warmup + 1.0)
        result["plain"], result["stream"] = {}, {}
        for c in s.concurrencies:
            cpu = process.cpu_seconds() if process else 0.0
            upstream_cpu = self.upstream.cpu_seconds()
            with self._profiling(process, f"{contender.name}-plain-c{c}"):
                phase = self._plain(contender, c, s.duration)
            phase["gateway_cpu_s"] = (process.cpu_seconds() - cpu) if process else None
            phase["upstream_cpu_s"] = self.upstream.cpu_seconds() - upstream_cpu
            result["plain"][c] = phase
            print(f"  {contender.name} plain c={c}: {_brief(phase)}", file=sys.stderr, flush=True)
        for c in s.concurrencies:
            cpu = process.cpu_seconds() if process else 0.0
            with self._profiling(process, f"{contender.name}-stream-c{c}"):
                phase = self._stream(contender, c)
            phase["gateway_cpu_s"] = (process.cpu_seconds() - cpu) if process else None
            result["stream"][c] = phase
            print(f"  {contender.name} stream c={c}: {_brief(phase)}", file=sys.stderr, flush=True)
        best = max(result["plain"].values(), key=lambda p: p["rps"])
        result["max_rps"] = best["rps"]
        if process and best["completed"]:
            result["cpu_s_per_1k"] = best["gateway_cpu_s"] / best["completed"] * 1000
        result["hold"] = self._hold(contender, process)

    @contextlib.contextmanager
    def _profiling(self, process: Process | None, name: str) -> Iterator[None]:
        """py-spy on the contender during a phase (blocking: whole stacks, a little slower)."""
        if self.profile is None or process is None or self.profile_match not in name:
            yield
            return
        self.profile.mkdir(parents=True, exist_ok=True)
        argv = [
            shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--subprocesses",
            "--rate",
            "250",
            "--format",
            "raw",
            "-o",
            str(self.profile / f"{name}.txt"),
            "-p",
            str(process.popen.pid),
        ]
        spy = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pinned(self.cores.instrument),
        )
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)

    def _plain(self, contender: Contender, concurrency: int, duration: float) -> dict[str, Any]:
        url = f"{contender.base_url}/chat/completions"
        body = json.dumps(
            {
                "model": MODEL,
                "max_tokens": self.settings.chunks,
                "messages": [{"role": "user", "content": "Hello!"}],
            }
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        before_cpu = before.ru_utime + before.ru_stime
        if self.has_wrk:
            argv = [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "30s",
                "-s",
                str(WRK_SCRIPT),
                url,
            ]
            env = {"BENCH_BODY": body, "BENCH_KEY": contender.key or ""}
            out, cpu = run_measured(argv, env, self.cores.instrument)
            phase = _from_wrk(json.loads(out.strip().splitlines()[-1]))
        else:
            out, cpu = run_measured(
                self._load_argv(contender, concurrency, duration), {}, self.cores.instrument
            )
            phase = json.loads(out)
        phase["loadgen_cpu_s"] = cpu - before_cpu
        phase["loadgen"] = "wrk" if self.has_wrk else "bench.load"
        return phase

    def _stream(self, contender: Contender, concurrency: int) -> dict[str, Any]:
        s = self.settings
        argv = [*self._load_argv(contender, concurrency, s.duration), "--stream"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        upstream_cpu = self.upstream.cpu_seconds()
        out, cpu = run_measured(argv, {}, self.cores.instrument)
        phase: dict[str, Any] = json.loads(out)
        phase["loadgen_cpu_s"] = cpu - (before.ru_utime + before.ru_stime)
        phase["upstream_cpu_s"] = self.upstream.cpu_seconds() - upstream_cpu
        return phase

    def _load_argv(self, contender: Contender, concurrency: int, duration: float) -> list[str]:
        s = self.settings
        url = f"{contender.base_url}/chat/completions"
        argv = [
            sys.executable,
            "-m",
            "bench.load",
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--warmup",
            str(s.warmup),
            "--max-tokens",
            str(s.chunks),
        ]
        return [*argv, "--key", contender.key] if contender.key else argv

    def _hold(self, contender: Contender, process: Process | None) -> dict[str, Any]:
        """RSS with `hold` slow streams open; then whether the upstream streams close."""
        s = self.settings
        self.pace(10**6, 1000)
        argv = [*self._load_argv(contender, 1, 60), "--hold", str(s.hold)]
        load = subprocess.Popen(
            argv,
            cwd=peers.REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=pinned(self.cores.instrument),
        )
        try:
            assert load.stdout is not None and load.stdin is not None
            opened = json.loads(load.stdout.readline() or b"{}")
            time.sleep(1)
            out: dict[str, Any] = {**opened, "wanted": s.hold}
            out["rss_mb"] = process.rss_mb() if process else None
            out["upstream_streams"] = self.open_upstream_streams()
            load.stdin.close()
            load.wait(30)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        deadline = time.monotonic() + 5
        while self.open_upstream_streams() and time.monotonic() < deadline:
            time.sleep(0.1)
        out["upstream_streams_left_after_5s"] = self.open_upstream_streams()
        self.pace(s.chunks, s.interval_ms)
        return out


def _from_wrk(wrk: dict[str, Any]) -> dict[str, Any]:
    seconds = wrk["duration_us"] / 1e6
    lat = {k: v / 1000 for k, v in wrk["latency_us"].items()}
    errors = sum(wrk["errors"].values())
    return {
        "window_s": seconds,
        "completed": wrk["requests"],
        "rps": wrk["requests"] / seconds,
        "errors": errors,
        "error_samples": [json.dumps(wrk["errors"])] if errors else [],
        "latency": lat,
    }


def _brief(phase: dict[str, Any]) -> str:
    lat = phase.get("ttft") or phase.get("latency") or {}
    chunks = f", {phase['chunks_per_s']:.0f} chunks/s" if phase.get("chunks_per_s") else ""
    return (
        f"{phase['rps']:.0f} req/s, p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms"
        f"{chunks}, {phase['errors']} errors"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="create the peers' venvs and exit")
    parser.add_argument("--smoke", action="store_true", help="seconds: direct + enginegate only")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["direct", "enginegate", "enginegate-keyed", *peers.PEERS],
        help="contenders to run (direct always runs)",
    )
    parser.add_argument("--duration", type=float, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, nargs="+", help="instead of 1 64 512")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the c=64 phases into DIR (collapsed stacks)",
    )
    parser.add_argument(
        "--profile-phase",
        default="-c64",
        metavar="TEXT",
        help="profile phases whose name (e.g. plain-c1) contains this",
    )
    args = parser.parse_args(argv)
    if args.setup:
        for peer, status in peers.setup(list(peers.PEERS)).items():
            print(f"{peer}: {status}")
        return
    settings = Settings.smoke() if args.smoke else Settings()
    if args.duration:
        settings.duration = args.duration
    if args.concurrency:
        settings.concurrencies = tuple(args.concurrency)
    names = ["direct", "enginegate"] if args.smoke else ["direct", "enginegate", *peers.PEERS]
    if args.only:
        names = ["direct", *[n for n in args.only if n != "direct"]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 streams need 2,000+ fds

    cores = Cores.plan()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "settings": asdict(settings),
        "cores": {
            "gateway": sorted(cores.gateway or []),
            "instrument": sorted(cores.instrument or []),
        },
        "contenders": {},
    }
    with tempfile.TemporaryDirectory(prefix="enginegate-bench-") as tmp:
        bench = Bench(settings, cores, Path(tmp), args.profile)
        bench.profile_match = args.profile_phase
        report["loadgen"] = "wrk + bench.load" if bench.has_wrk else "bench.load"
        try:
            for contender in peers.build(names, bench.upstream_url, Path(tmp)):
                print(f"{contender.name}: {contender.status}", file=sys.stderr, flush=True)
                report["contenders"][contender.name] = bench.measure(contender)
        finally:
            bench.close()
    report["machine"]["load_after"] = os.getloadavg()
    suffix = "-smoke" if args.smoke else ""
    out = args.out or RESULTS / f"overhead-{report['date'][:10]}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    print(f"\nJSON: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
