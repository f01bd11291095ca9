"""GPU memory from NVML: series per GPU where there are GPUs, none (and no error) where not."""

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.gpu_metrics import GpuCollector

GIB = 2**30


class FakeNvml:
    """The few pynvml functions the collector calls, over a list of (name, used, total)."""

    def __init__(self, gpus: list[tuple[str | bytes, int, int]], init_error: bool = False):
        self.gpus = gpus
        self.init_error = init_error
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        _, used, total = self.gpus[handle]
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.gpus[handle][0]

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"


def scrape(collector: GpuCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_each_gpu_gets_used_and_total_bytes() -> None:
    nvml = FakeNvml([("NVIDIA H100 80GB HBM3", 3 * GIB, 80 * GIB), (b"NVIDIA H100", GIB, 80 * GIB)])
    found = {
        (s.name, s.labels["gpu"], s.labels["name"], s.labels["uuid"]): s.value
        for family in text_string_to_metric_families(scrape(GpuCollector(nvml)))
        for s in family.samples
    }
    assert found == {
        ("enginegate_gpu_memory_used_bytes", "0", "NVIDIA H100 80GB HBM3", "GPU-0000"): 3 * GIB,
        ("enginegate_gpu_memory_total_bytes", "0", "NVIDIA H100 80GB HBM3", "GPU-0000"): 80 * GIB,
        ("enginegate_gpu_memory_used_bytes", "1", "NVIDIA H100", "GPU-0001"): GIB,
        ("enginegate_gpu_memory_total_bytes", "1", "NVIDIA H100", "GPU-0001"): 80 * GIB,
    }


def test_nvml_is_started_once() -> None:
    nvml = FakeNvml([("A", 1, 2)])
    collector = GpuCollector(nvml)
    for _ in range(3):
        collector.read()
    assert nvml.inits == 1


def test_no_driver_means_no_series_and_no_retry() -> None:
    nvml = FakeNvml([], init_error=True)
    collector = GpuCollector(nvml)
    assert "enginegate_gpu" not in scrape(collector)
    assert collector.read() == []
    assert nvml.inits == 1


def test_no_gpus_means_no_series() -> None:
    assert "enginegate_gpu" not in scrape(GpuCollector(FakeNvml([])))


def test_a_failing_read_drops_the_series_for_that_scrape_only() -> None:
    nvml = FakeNvml([("A", 1, 2)])
    collector = GpuCollector(nvml)
    nvml.gpus = [("A", 1)]  # type: ignore[list-item]  # unpacking fails: like NVMLError_GpuIsLost
    assert collector.read() == []
    nvml.gpus = [("A", 1, 2)]
    assert [g.used_bytes for g in collector.read()] == [1]
