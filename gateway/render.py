"""`enginegate render k8s -c FILE [-o DIR]`: the config as Kubernetes manifests (gateway/k8s.py).

One file for the gateway and one per engine model, each a multi-document YAML stream for
`kubectl apply -f DIR`. Variables the config names are read from a Secret, never written out:
unset ones are filled with a marker while rendering, and an engine manifest that would carry
a marker (its argv needs the value itself) is refused, naming the variable.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from backends.placement import PlacementError, check_names
from gateway import k8s
from gateway.config import _VAR as VARIABLE  # the one spelling of ${VAR} and ${VAR:-default}
from gateway.config import ConfigError, load_config

MARKER = "enginegate-render-unset-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="target", required=True)
    sub = targets.add_parser("k8s", help="Kubernetes manifests (Deployments, LeaderWorkerSets)")
    sub.add_argument("-c", "--config", default="enginegate.yaml", help="config file")
    sub.add_argument("-o", "--output", default="k8s", help="directory to write (default: k8s)")
    sub.add_argument("--image", default="enginegate:latest", help="the gateway's image")
    sub.add_argument(
        "--engine-image",
        action="append",
        default=[],
        metavar="BACKEND=IMAGE",
        help="image for an engine (repeat); defaults: "
        + ", ".join(f"{b}={i}" for b, i in k8s.DEFAULT_ENGINE_IMAGES.items()),
    )
    sub.add_argument("--secret", default="enginegate", help="the Secret holding the variables")


def run(args: argparse.Namespace) -> int:
    try:
        files, variables = render(args.config, args.image, _images(args), args.secret)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, documents in files.items():
        (out / name).write_text(k8s.dump(documents))
        print(f"wrote {out / name}")
    keys = " ".join(f"--from-literal={name}=..." for name in sorted(variables))
    print(f"\nbefore `kubectl apply -f {out}`, create the Secret they read:\n"
          f"  kubectl create secret generic {args.secret} {keys}")  # fmt: skip
    return 0


def render(
    file: str, image: str, engine_images: dict[str, str], secret: str
) -> tuple[dict[str, list[k8s.Manifest]], set[str]]:
    """File name → manifests, and the variables the Secret must hold."""
    raw = _read(file)
    named = _variables(raw)
    markers = {name: MARKER + name for name, has_default in named.items() if not has_default}
    config = load_config(file, markers | dict(os.environ))
    try:
        check_names(config.models)
    except PlacementError as exc:
        raise ConfigError(file, [str(exc)]) from None
    gateway_side = _variables(k8s.gateway_config(config, raw))
    files = {
        "enginegate.yaml": k8s.gateway_manifests(
            config, k8s.gateway_config(config, raw), gateway_side, image, secret
        )
    }
    problems: list[str] = []
    secrets = set(gateway_side) | {k8s.ENGINE_KEY}
    for index, spec in enumerate(config.models):
        if not spec.runs_here:
            continue
        env_from, refused = _env_from_secret(raw["models"][index], index)
        problems += refused
        secrets |= set(env_from.values())
        manifests = k8s.engine_manifests(spec, engine_images[spec.backend], secret, env_from)
        unset = sorted(name for name in named if MARKER + name in k8s.dump(manifests))
        if unset:
            problems.append(
                f"models[{index}]: {', '.join(unset)} not set: the engine's argv needs the "
                "value at render time"
            )
        files[f"{k8s.k8s_name(spec.name)}.yaml"] = manifests
    if problems:
        raise ConfigError(file, problems)
    return files, secrets


def _images(args: argparse.Namespace) -> dict[str, str]:
    images = dict(k8s.DEFAULT_ENGINE_IMAGES)
    for item in args.engine_image:
        backend, _, image = item.partition("=")
        if backend not in images or not image:
            known = ", ".join(images)
            raise SystemExit(f"error: --engine-image {item!r}: expected BACKEND=IMAGE ({known})")
        images[backend] = image
    return images


def _read(file: str) -> dict[str, Any]:
    """The file as written; load_config has the final word on what is wrong with it."""
    try:
        raw = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError):
        raw = None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        load_config(file)  # raises the ConfigError that says why
        raise ConfigError(file, ["expected a mapping with `gateway:` and `models:` at the top"])
    return raw


def _variables(node: Any) -> dict[str, bool]:
    """Every ${VAR} in a YAML tree → whether it has a default (`${VAR:-x}`)."""
    if isinstance(node, dict):
        found: dict[str, bool] = {}
        for value in node.values():
            found |= _variables(value)
        return found
    if isinstance(node, list):
        return _variables(dict(enumerate(node)))
    if not isinstance(node, str):
        return {}
    return {m[2]: m[3] is not None for m in VARIABLE.finditer(node) if m[2]}


def _env_from_secret(entry: dict[str, Any], index: int) -> tuple[dict[str, str], list[str]]:
    """A model's `env:` entries that name a variable: read from the Secret, never written out.
    Only a whole `${VAR}` can be: a value that mixes text and variables is refused."""
    env_from, problems = {}, []
    env = entry.get("env") or {}
    for key, value in env.items() if isinstance(env, dict) else ():
        whole = VARIABLE.fullmatch(str(value))
        if whole and whole[2]:
            env_from[key] = whole[2]
        elif _variables(str(value)):
            problems.append(
                f"models[{index}].env.{key}: write the whole value as one ${{VAR}} so the "
                "manifest can read it from the Secret"
            )
    return env_from, problems
