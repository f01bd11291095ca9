"""Relabelling engines' /metrics pages: on a page recorded from vLLM, and on the format's corners.

data/vllm_cpu_0.32.0_metrics.txt is GET /metrics of a vLLM CPU 0.32.0 engine serving the tiny
test model, recorded after it had answered a few requests.
"""

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.exposition import merge, relabel, split_sample

VLLM_PAGE = (Path(__file__).parent / "data" / "vllm_cpu_0.32.0_metrics.txt").read_text()
OURS = {"model": "tiny", "worker": "tiny-0"}


def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_vllm_sample_gets_model_and_worker_and_keeps_its_value() -> None:
    out = merge([relabel(VLLM_PAGE, OURS)])
    before, after = samples(VLLM_PAGE), samples(out)
    assert len(after) == len(before) > 400
    assert {(n, tuple(sorted({**dict(ls), **OURS}.items())), v) for n, ls, v in before} == after
    kv = [s for s in after if s[0] == "vllm:kv_cache_usage_perc"]
    assert kv and dict(kv[0][1]) == {"engine": "0", "model_name": "tiny", **OURS}


def test_two_workers_give_one_help_and_type_per_family_and_contiguous_families() -> None:
    second = VLLM_PAGE.replace('model_name="tiny"', 'model_name="tiny-tp2"')
    out = merge(
        [relabel(VLLM_PAGE, OURS), relabel(second, {"model": "tiny-tp2", "worker": "tiny-tp2-0"})]
    )
    types = re.findall(r"^# TYPE (\S+)", out, re.M)
    assert len(types) == len(set(types)) == len(re.findall(r"^# TYPE ", VLLM_PAGE, re.M))
    assert len(re.findall(r"^# HELP ", out, re.M)) == len(types)
    # Every family is one block: its TYPE line, then only its own samples.
    for line in out.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif not line.startswith("#"):
            assert split_sample(line)[0].startswith(current), (current, line)
    ttft = [
        ln for ln in out.splitlines() if ln.startswith("vllm:time_to_first_token_seconds_count")
    ]
    assert ['worker="tiny-0"' in ttft[0], 'worker="tiny-tp2-0"' in ttft[1]] == [True, True]
    assert len(samples(out)) == 2 * len(samples(VLLM_PAGE))


def test_an_engine_label_named_like_ours_is_kept_as_exported() -> None:
    page = '# TYPE reqs counter\nreqs_total{model="llama",code="200"} 3\n'
    out = merge([relabel(page, OURS)])
    assert 'reqs_total{model="tiny",worker="tiny-0",exported_model="llama",code="200"} 3' in out


def test_quotes_braces_commas_and_timestamps_survive() -> None:
    page = 'odd{path="/a{b}",msg="x,\\"y\\"} z"} 1.5 1700000000000\nplain 7\n'
    out = merge([relabel(page, OURS)])
    assert (
        'odd{model="tiny",worker="tiny-0",path="/a{b}",msg="x,\\"y\\"} z"} 1.5 1700000000000' in out
    )
    assert 'plain{model="tiny",worker="tiny-0"} 7' in out
    parsed = {s.name: s for f in text_string_to_metric_families(out) for s in f.samples}
    assert parsed["odd"].labels["msg"] == 'x,"y"} z'
    assert parsed["odd"].timestamp == 1700000000.0


def test_our_label_values_are_escaped() -> None:
    out = merge([relabel("up 1\n", {"model": 'a"b\\c', "worker": "w"})])
    [sample] = samples(out)
    assert dict(sample[1])["model"] == 'a"b\\c'


def test_a_family_typed_differently_by_another_worker_is_left_out_for_that_worker() -> None:
    gauge = relabel("# TYPE x gauge\nx 1\n", {"worker": "a"})
    counter = relabel("# TYPE x counter\nx 2\n", {"worker": "b"})
    out = merge([gauge, counter])
    assert out == '# TYPE x gauge\nx{worker="a"} 1\n'


def test_nothing_to_merge_is_an_empty_page() -> None:
    assert merge([]) == ""
    assert merge([relabel("# just a comment\n\n", OURS)]) == ""
