"""Reading a Prometheus text page in tests: the samples of one name that carry some labels."""

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(page: str, name: str, **labels: str) -> list[Sample]:
    """The samples named `name` whose labels include `labels` (others may differ)."""
    return [
        sample
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def sample_values(page: str, name: str, **labels: str) -> list[float]:
    """Values of the samples named `name` whose labels include `labels` (others may differ)."""
    return [sample.value for sample in samples(page, name, **labels)]
