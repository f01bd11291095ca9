"""The alive nodes of a Ray cluster and their resources, read through Ray's own client.

Ray is optional (`pip install 'enginegate[ray]'`) and imported only here, only when a config
names a cluster. `ray.init(address=...)` joins as a driver, which Ray allows only on a host
that runs a node of that cluster (the head, as in vLLM's and LMDeploy's recipes);
`cluster.node_ip` says which of this host's addresses is that node's, when Ray would guess
another (several interfaces, or nodes on loopback addresses as in the tests).
"""

from typing import Any

from backends.cluster import ClusterSpec, Node


class ClusterUnavailable(Exception):
    """Ray is not installed, or the cluster cannot be reached."""


def read_nodes(cluster: ClusterSpec) -> list[Node]:
    """Every alive node, in the order Ray lists them."""
    try:
        import ray
    except ImportError:
        raise ClusterUnavailable(
            "the ray package is not installed: pip install 'enginegate[ray]'"
        ) from None
    options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if cluster.node_ip:
        options["_node_ip_address"] = cluster.node_ip
    try:
        ray.init(address=cluster.ray, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnavailable(f"cannot join the Ray cluster at {cluster.ray}: {exc}") from None
    try:
        return [_node(info) for info in ray.nodes() if info.get("Alive")]
    finally:
        ray.shutdown()


def _node(info: dict[str, Any]) -> Node:
    resources = info.get("Resources", {})
    return Node(
        id=str(info["NodeID"]),
        address=str(info.get("NodeManagerAddress", "?")),
        gpus=int(resources.get("GPU", 0)),
        cpus=int(resources.get("CPU", 0)),
    )
