"""Every engine adapter, by the `backend:` name a model entry gives."""

from backends.base import Adapter
from backends.external import ExternalAdapter
from backends.lmdeploy import LmdeployAdapter
from backends.sglang import SglangAdapter
from backends.vllm import VllmAdapter

ADAPTERS: dict[str, Adapter] = {
    "vllm": VllmAdapter(),
    "sglang": SglangAdapter(),
    "lmdeploy": LmdeployAdapter(),
    "external": ExternalAdapter(),
}
