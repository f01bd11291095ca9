"""Which HTTP client and event loop should the proxy use upstream? CPU per request, measured.

    python -m bench.clients [--concurrency 64 512] [--requests 4000]

Each client runs in a fresh process, pinned to one core, against bench/upstream.py on another,
with `concurrency` requests in flight at once over one shared pool (as the gateway does), and
reports the CPU it spent per request (non-streaming) and per streamed answer (25 chunks read
with aiter_raw/iter_any, as the relay does). Fewer microseconds = more headroom for the gateway.
aiohttp is optional (`pip install aiohttp`); without it those rows are skipped.
"""

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.contenders import direct, free_port
from bench.procs import Cores, Process, wait_ready

CLIENTS = ("httpx/asyncio", "httpx/uvloop", "aiohttp/asyncio", "aiohttp/uvloop")
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 25}


async def _httpx(url: str, concurrency: int, requests: int, stream: bool) -> int:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)  # as the gateway
    body = json.dumps({**BODY, "stream": stream}).encode()
    headers = {"content-type": "application/json"}
    done = 0
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:

        async def worker() -> None:
            nonlocal done
            while done < requests:
                done += 1
                request = client.build_request("POST", url, content=body, headers=headers)
                response = await client.send(request, stream=True)
                async for _ in response.aiter_raw():
                    pass
                await response.aclose()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def _aiohttp(url: str, concurrency: int, requests: int, stream: bool) -> int:
    import aiohttp

    body = json.dumps({**BODY, "stream": stream}).encode()
    headers = {"content-type": "application/json"}
    done = 0
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def worker() -> None:
            nonlocal done
            while done < requests:
                done += 1
                async with session.post(url, data=body, headers=headers) as response:
                    async for _ in response.content.iter_any():
                        pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def one(name: str, url: str, concurrency: int, requests: int, stream: bool) -> dict[str, Any]:
    library, loop = name.split("/")
    __import__(library)  # imported before the clock starts: only requests are counted
    run = _httpx if library == "httpx" else _aiohttp
    coroutine = run(url, concurrency, requests, stream)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if loop == "uvloop":
        import uvloop

        count = uvloop.run(coroutine)
    else:
        count = asyncio.run(coroutine)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "client": name,
        "concurrency": concurrency,
        "stream": stream,
        "requests": count,
        "cpu_us_per_request": cpu / count * 1e6,
        "requests_per_s": count / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = one(args.one, args.url, args.concurrency[0], args.requests, args.stream)
        print(json.dumps(result))
        return
    cores = Cores.plan()
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--interval-ms", "2"]
    upstream = Process("upstream", argv, {}, cores.instrument, Path(os.devnull))
    try:
        wait_ready(direct(f"http://127.0.0.1:{port}"), upstream, timeout=20)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print("| client | c | stream | CPU µs / request | requests/s |\n|---|---:|---|---:|---:|")
        for stream in (False, True):
            for concurrency in args.concurrency:
                for name in CLIENTS:
                    if name.startswith("aiohttp") and not _has("aiohttp"):
                        continue
                    child = [
                        sys.executable,
                        "-m",
                        "bench.clients",
                        "--one",
                        name,
                        "--url",
                        url,
                        "--concurrency",
                        str(concurrency),
                        "--requests",
                        str(args.requests),
                    ]
                    if stream:
                        child.append("--stream")
                    done = subprocess.run(
                        child,
                        capture_output=True,
                        text=True,
                        check=False,
                        preexec_fn=(lambda: os.sched_setaffinity(0, cores.gateway))
                        if cores.gateway
                        else None,
                    )
                    if done.returncode != 0:
                        why = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
                        print(f"| {name} | {concurrency} | {stream} | failed: {why} | |")
                        continue
                    r = json.loads(done.stdout)
                    print(
                        f"| {name} | {concurrency} | {'yes' if stream else 'no'} "
                        f"| {r['cpu_us_per_request']:.0f} | {r['requests_per_s']:.0f} |",
                        flush=True,
                    )
    finally:
        upstream.stop()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
