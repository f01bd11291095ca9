"""GPU memory per GPU, read from NVML at scrape time.

NVML comes from the optional `nvidia-ml-py` package (`pip install enginegate[gpu]`). Without it,
or without an NVIDIA driver, there are simply no GPU series: a CPU-only gateway is normal.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("enginegate.metrics")


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    uuid: str
    used_bytes: int
    total_bytes: int


class GpuCollector(Collector):
    """`enginegate_gpu_memory_{used,total}_bytes{gpu,name,uuid}`; NVML is started on first use.

    `nvml` is the `pynvml` module, or a stand-in with the same functions in tests; None means
    import it if it is installed.
    """

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._state = "new"  # → "on" once nvmlInit worked, "off" for good if it did not

    def read(self) -> list[GpuMemory]:
        nvml = self._start()
        if nvml is None:
            return []
        try:
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name, uuid = nvml.nvmlDeviceGetName(handle), nvml.nvmlDeviceGetUUID(handle)
                gpus.append(GpuMemory(index, _text(name), _text(uuid), memory.used, memory.total))
            return gpus
        except Exception as exc:  # a GPU fallen off the bus must not break the whole scrape
            log.warning("reading GPU memory from NVML failed: %s", exc)
            return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gpus = self.read()
        if not gpus:
            return
        labels = ["gpu", "name", "uuid"]
        used = GaugeMetricFamily(
            "enginegate_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=labels
        )
        total = GaugeMetricFamily(
            "enginegate_gpu_memory_total_bytes", "GPU memory installed", labels=labels
        )
        for gpu in gpus:
            ids = [str(gpu.index), gpu.name, gpu.uuid]
            used.add_metric(ids, gpu.used_bytes)
            total.add_metric(ids, gpu.total_bytes)
        yield used
        yield total

    def _start(self) -> Any | None:
        if self._state == "new":
            self._state = "off"
            try:
                if self._nvml is None:
                    import pynvml

                    self._nvml = pynvml
                self._nvml.nvmlInit()
                self._state = "on"
            except ImportError:
                log.debug("nvidia-ml-py is not installed: no GPU memory metrics")
            except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                log.info("NVML unavailable, no GPU memory metrics: %s", exc)
        return self._nvml if self._state == "on" else None


def _text(value: str | bytes) -> str:
    """Older pynvml releases return bytes."""
    return value.decode() if isinstance(value, bytes) else value
