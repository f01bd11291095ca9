"""Prometheus text format, read only as far as relabelling needs: families and label blocks.

`relabel` adds labels to every sample of one engine's /metrics page; `merge` joins several
pages into one, keeping a single HELP and TYPE per family and each family's samples together
(the text format wants one group per family). Values, timestamps and the engine's own labels
pass through untouched; an engine label that clashes with ours is kept as `exported_<name>`,
as Prometheus itself does with `honor_labels: false`.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

# The sample names a family of each type may have besides its own name.
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_gcount", "_gsum", "_info")


@dataclass
class Family:
    name: str
    help: str | None = None  # the whole `# HELP` line
    type: str | None = None  # the whole `# TYPE` line
    samples: list[str] = field(default_factory=list)


def relabel(text: str, labels: dict[str, str]) -> dict[str, Family]:
    """The families of one page, in page order, with `labels` first on every sample."""
    ours = ",".join(f'{name}="{escape(value)}"' for name, value in labels.items())
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = families.setdefault(parts[2], Family(parts[2]))
                setattr(current, parts[1].lower(), line)
            continue  # other comments (and `# EOF`) are dropped
        if not line.strip():
            continue
        name, their_labels, rest = split_sample(line)
        if current is None or not _belongs(name, current.name):
            current = families.setdefault(name, Family(name))
        merged = ",".join(filter(None, [ours, _rename(their_labels, labels)]))
        current.samples.append(f"{name}{{{merged}}}{rest}")
    return families


def merge(pages: Iterable[dict[str, Family]]) -> str:
    """One text page from many; a family whose TYPE differs from the first one seen is dropped
    for that page, since Prometheus would reject the whole scrape over it."""
    merged: dict[str, Family] = {}
    for page in pages:
        for name, family in page.items():
            into = merged.setdefault(name, Family(name, family.help, family.type))
            if family.type and into.type and _kind(family.type) != _kind(into.type):
                continue
            into.help = into.help or family.help
            into.type = into.type or family.type
            into.samples += family.samples
    lines: list[str] = []
    for family in merged.values():
        lines += filter(None, [family.help, family.type])
        lines += family.samples
    return "\n".join(lines) + "\n" if lines else ""


def split_sample(line: str) -> tuple[str, str, str]:
    """`a{b="}"} 1 2` → (`a`, `b="}"`, ` 1 2`): name, inside of the braces, value and time."""
    end = 0
    while end < len(line) and line[end] not in "{ \t":
        end += 1
    name = line[:end]
    if end == len(line) or line[end] != "{":
        return name, "", line[end:]
    i, in_quotes = end + 1, False
    while i < len(line):
        char = line[i]
        if in_quotes and char == "\\":
            i += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char == "}" and not in_quotes:
            return name, line[end + 1 : i], line[i + 1 :]
        i += 1
    raise ValueError(f"unterminated label set: {line[:200]}")


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _belongs(sample: str, family: str) -> bool:
    return sample == family or (sample.startswith(family) and sample[len(family) :] in _SUFFIXES)


def _kind(type_line: str) -> str:
    return type_line.split()[-1]


def _rename(their_labels: str, ours: dict[str, str]) -> str:
    """Their label pairs, with any name we set ourselves renamed to `exported_<name>`."""
    if not their_labels.strip():
        return ""
    pairs = []
    for pair in _label_pairs(their_labels):
        name, _, value = pair.partition("=")
        name = name.strip()
        pairs.append(f"exported_{name}={value}" if name in ours else f"{name}={value}")
    return ",".join(pairs)


def _label_pairs(labels: str) -> list[str]:
    """`a="x,y",b="z"` → [`a="x,y"`, `b="z"`]: split on commas outside quotes."""
    pairs, start, i, in_quotes = [], 0, 0, False
    while i < len(labels):
        char = labels[i]
        if in_quotes and char == "\\":
            i += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char == "," and not in_quotes:
            pairs.append(labels[start:i])
            start = i + 1
        i += 1
    pairs.append(labels[start:])
    return [p.strip() for p in pairs if p.strip()]
