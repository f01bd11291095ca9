"""Summarise py-spy's collapsed stacks (`--format raw`): where a process spent its samples.

    python -m bench.stacks PROFILE.txt [--top 25] [--match gateway/]

Prints the top functions by inclusive share (the function or anything it called) and by
self share (the function itself), so a hot-path cost can be named with its file and line.
Samples waiting in the event loop's epoll are idle time and are left out of the shares.
"""

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE = "EpollSelector.select ("
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """`send (httpx/_client.py)`: the function and the tail of its file, without the line."""
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        file = file.split(marker, 1)[-1]
    return f"{match['func']} ({file})"


def summarise(stacks: list[tuple[list[str], int]], top: int, match: str | None) -> str:
    total = sum(count for frames, count in stacks if not short(frames[-1]).startswith(IDLE))
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, count in stacks:
        names = [short(f) for f in frames if not f.startswith("process ")]
        if names and names[-1].startswith(IDLE):
            continue
        for name in set(names):
            inclusive[name] += count
        if names:
            own[names[-1]] += count
    lines = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"\ntop {top} by {title} share")
        shown = 0
        for name, count in counter.most_common():
            if match and match not in name:
                continue
            lines.append(f"{count / total:6.1%}  {name}")
            shown += 1
            if shown == top:
                break
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only functions whose file or name contains this")
    args = parser.parse_args()
    print(summarise(load(args.profile), args.top, args.match))


if __name__ == "__main__":
    main()
