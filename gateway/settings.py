"""Gateway settings that a reload applies at once, in one place: `apply_settings`.

Keys, timeouts, body limit, per-model admission, routing policies and aliases live in objects
the hot path reads on every request (Gateway.keys, Proxy, Admission, Upstream); this swaps or
updates them between two requests, so a request sees either the old settings or the new ones.
A request already admitted keeps the Admission it entered through. Anything that holds a
setting read from the config must be updated here (and nowhere else) to follow a reload.
"""

from gateway.config import Config
from gateway.limits import Admission
from gateway.routing import make_policy
from gateway.state import Gateway
from gateway.tenancy import config_keys


def apply_settings(gateway: Gateway, config: Config) -> None:
    """Make `config`'s gateway and per-model settings the running ones. Admission and routing
    of a model that is gone stay until `forget_models` (its workers may still drain)."""
    g = config.gateway
    old = gateway.config
    gateway.keys.set_config_keys(config_keys(g), g.allow_unauthenticated and not g.api_keys)
    if gateway.admin is not None:
        gateway.admin.update(g.admin_keys, gateway.keys)
    proxy = gateway.proxy
    proxy.is_fair = g.queueing == "fair"
    proxy.priority_models = priority_models(config)
    proxy.max_body_bytes = g.max_body_bytes
    proxy.send_timeout = g.send_timeout
    proxy.upstream.set_timeouts(g.connect_timeout, g.read_timeout)
    proxy.aliases = {alias: m.name for m in config.models for alias in m.aliases}
    was = {m.name: m for m in old.models}
    for spec in config.models:
        admission = proxy.admissions.get(spec.name)
        if admission is None:
            proxy.admissions[spec.name] = Admission(
                spec.max_in_flight, spec.max_queue, spec.queue_timeout
            )
        else:
            admission.configure(spec.max_in_flight, spec.max_queue, spec.queue_timeout)
        before = was.get(spec.name)
        if before is None or (before.routing, before.prefix_chars) != (
            spec.routing,
            spec.prefix_chars,
        ):
            proxy.policies[spec.name] = make_policy(spec.routing, spec.prefix_chars)
    gateway.config = config


def priority_models(config: Config) -> frozenset[str]:
    """Models whose engine schedules by the request's `priority` (vLLM's
    --scheduling-policy priority): the gateway sets it from the key's priority class."""
    return frozenset(
        m.name for m in config.models if m.engine_args.get("scheduling-policy") == "priority"
    )


def forget_models(gateway: Gateway, names: list[str]) -> None:
    """Drop the admission of models that are gone and drained. Their routing policy stays
    (a few bytes): a request admitted just before may still be on its way to routing."""
    for name in names:
        gateway.proxy.admissions.pop(name, None)
