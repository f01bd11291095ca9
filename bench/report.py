"""The overhead benchmark's Markdown tables from its JSON (`python -m bench.report FILE`).

Direct's row holds absolute figures; every other row says what the contender adds to them
(latency, TTFT) or how it compares (× direct) at the same concurrency.
"""

import sys
from pathlib import Path
from typing import Any


def render(report: dict[str, Any]) -> str:
    contenders = report["contenders"]
    direct = contenders.get("direct", {})
    settings = report["settings"]
    levels = [int(c) for c in settings["concurrencies"]]
    machine = report["machine"]
    lines = [
        f"{report['date']}, commit {report['commit']}, {machine['cpu']} ({machine['cores']} cores,"
        f" {machine['memory_gib']} GiB), load average before {machine['load_before'][0]:.2f}; "
        f"streams of {settings['chunks']} chunks every {settings['interval_ms']:g} ms, "
        f"{settings['duration']:g} s per phase; load: {report.get('loadgen', '?')}",
        "",
        "Latency, ms, p50 / p99 (direct: absolute; others: added to direct's)",
        "",
        "| contender | "
        + " | ".join(f"request c={c}" for c in levels)
        + " | "
        + " | ".join(f"TTFT c={c}" for c in levels)
        + " |",
        "|---|" + "---:|" * (2 * len(levels)),
    ]
    for name, result in contenders.items():
        if result.get("status") != "ok":
            continue
        cells = [_latency(result, direct, "plain", "latency", c, name == "direct") for c in levels]
        cells += [_latency(result, direct, "stream", "ttft", c, name == "direct") for c in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    top = levels[-1]
    mid = levels[len(levels) // 2] if len(levels) > 2 else levels[0]
    lines += [
        "",
        "Throughput and resources (× direct in parentheses)",
        "",
        f"| contender | max req/s | chunks/s c={mid} | chunks/s c={top} | CPU s / 1k req "
        f"| RSS idle MB | RSS {settings['hold']} streams MB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in contenders.items():
        if result.get("status") != "ok":
            continue
        lines.append(
            f"| {name} | {_ratio(result.get('max_rps'), direct.get('max_rps'), name)} "
            f"| {_ratio(_chunks(result, mid), _chunks(direct, mid), name)} "
            f"| {_ratio(_chunks(result, top), _chunks(direct, top), name)} "
            f"| {_num(result.get('cpu_s_per_1k'), 2)} | {_num(result.get('idle_rss_mb'), 0)} "
            f"| {_hold(result)} | {_errors(result)} |"
        )
    skipped = [f"- {n}: {r['status']}" for n, r in contenders.items() if r.get("status") != "ok"]
    if skipped:
        lines += ["", "Not measured:", *skipped]
    return "\n".join(lines)


def _phase(result: dict[str, Any], kind: str, level: int) -> dict[str, Any]:
    phases = result.get(kind) or {}
    return phases.get(level) or phases.get(str(level)) or {}


def _latency(result: dict, direct: dict, kind: str, metric: str, level: int, is_base: bool) -> str:
    mine = _phase(result, kind, level).get(metric)
    if not mine:
        return "-"
    if is_base:
        return f"{mine['p50']:.2f} / {mine['p99']:.2f}"
    base = _phase(direct, kind, level).get(metric)
    if not base:
        return "-"
    return f"{mine['p50'] - base['p50']:+.2f} / {mine['p99'] - base['p99']:+.2f}"


def _chunks(result: dict[str, Any], level: int) -> float | None:
    value = _phase(result, "stream", level).get("chunks_per_s")
    return float(value) if value is not None else None


def _ratio(value: float | None, base: float | None, name: str) -> str:
    if value is None:
        return "-"
    if name == "direct" or not base:
        return f"{value:,.0f}"
    return f"{value:,.0f} ({value / base:.2f})"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _hold(result: dict[str, Any]) -> str:
    hold = result.get("hold") or {}
    if hold.get("rss_mb") is None:
        return "-"
    note = f" ({hold.get('open', 0)} open)" if hold.get("open") != hold.get("wanted") else ""
    left = hold.get("upstream_streams_left_after_5s")
    if left:
        note += f", {left} upstream streams left open"
    return f"{hold['rss_mb']:.0f}{note}"


def _errors(result: dict[str, Any]) -> str:
    phases = [*(result.get("plain") or {}).values(), *(result.get("stream") or {}).values()]
    held = (result.get("hold") or {}).get("errors", 0)
    return str(sum(p.get("errors", 0) for p in phases) + held)


def main() -> None:
    import json

    print(render(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
