"""One replica over several hosts: the flags each engine's own multi-node launch adds.

Every host runs the same engine command (the adapter's argv) plus these flags; rank 0 serves
HTTP, the others join its torch.distributed world (../shared/reviews/multinode-2026-12.md §1):

- vLLM (multiprocessing executor, no Ray): `--nnodes N --node-rank R --master-addr H0
  --master-port P`, and `--headless` on every rank but 0 (it serves no API). tp*pp is the whole
  world: `-tp 8 -pp 2 --nnodes 2` is 8 GPUs on each of 2 hosts.
- SGLang: `--nnodes N --node-rank R --dist-init-addr H0:P`; `--tp-size` is the whole world
  (`--tp 16 --nnodes 2`: 8 GPUs a host). Only rank 0 serves the API, but every rank binds
  `--port` (the others answer a health check that proves nothing).
- LMDeploy: tensor parallel across hosts needs a Ray cluster under the engine; not built here
  (the spec refuses `nodes:` for it).

The leader's address and a rank may be given as text the runtime expands later, e.g.
Kubernetes' `$(LWS_LEADER_ADDRESS)` and `$(LWS_WORKER_INDEX)`.
"""

from backends.spec import MULTI_NODE_BACKENDS, ModelSpec

RENDEZVOUS_PORT = 29501  # vLLM's --master-port default; any port the leader's host has free


def node_flags(spec: ModelSpec, rank: str, leader: str, port: int = RENDEZVOUS_PORT) -> list[str]:
    """The flags that make the adapter's argv rank `rank` of `spec.nodes` hosts."""
    if spec.backend not in MULTI_NODE_BACKENDS:
        raise ValueError(f"{spec.backend} has no multi-node launch here")
    flags = ["--nnodes", str(spec.nodes), "--node-rank", rank]
    if spec.backend == "sglang":
        return [*flags, "--dist-init-addr", f"{leader}:{port}"]
    flags += ["--master-addr", leader, "--master-port", str(port)]
    return flags if rank == "0" else [*flags, "--headless"]
