"""Memory estimate against figures computed by hand from the published config.json files.

DeepSeek-R1-Distill-Qwen-1.5B (Qwen2 architecture; deploy/examples/model-configs/):
    hidden 1536, 28 layers, 12 heads, 2 KV heads (head_dim 128), MLP 8960, vocab 151936, untied
    embedding + LM head   2 * 151936 * 1536                        =   466,747,392
    per layer             q 1536*1536+1536 = 2,360,832; k, v 1536*256+256 = 393,472 each;
                          o 1536*1536 = 2,359,296; MLP 3*1536*8960 = 41,287,680; norms 3,072
                                                                   =    46,797,824
    28 layers + final norm 1536                                    = 1,310,340,608
    parameters                                                     = 1,777,088,000
    KV per token, TP1     28 layers * 2 KV heads * (K+V) 256 values * 2 B = 28,672 B (bf16)

DeepSeek-R1 (MLA + MoE, FP8 weights):
    embedding + LM head   2 * 129280 * 7168                        =     1,853,358,080
    attention per layer   q_a 7168*1536 + 1536 + q_b 1536*128*192
                          + kv_a 7168*576 + 512 + kv_b 512*128*256 + o 128*128*7168
                                                                   =       187,107,328
    3 dense MLPs          3*7168*18432 each                        =       396,361,728
    58 MoE layers         3*7168*(256*2048 + 2048) + router 7168*256 = 11,320,164,352
    parameters (+ 61 * 2 norms of 7168, final norm)                =   671,026,404,352
    KV per token          61 layers * (512 + 64) latent * 2 B       =            70,272 B
"""

import json
from pathlib import Path
from typing import Any

import pytest

from backends import memory
from backends.adapters import ADAPTERS
from backends.memory import GIB, Estimate, ModelShape, load_shape, shape_from_config
from backends.spec import ModelSpec

CONFIGS = Path(__file__).parents[2] / "deploy" / "examples" / "model-configs"
DISTILL = json.loads((CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B.json").read_text())
R1 = json.loads((CONFIGS / "DeepSeek-R1.json").read_text())


def spec(backend: str = "vllm", **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": "m", "backend": backend, "model": "/models/m", **fields})


def estimate(shape: ModelShape, spec: ModelSpec) -> Estimate:
    """The estimate with the context flag of the spec's engine, as the plan asks for it."""
    return memory.estimate(shape, spec, ADAPTERS[spec.backend].context_flag)


def test_distill_shape() -> None:
    shape = shape_from_config(DISTILL)
    assert shape.params == 1_777_088_000
    assert shape.embedding_params == 466_747_392
    assert (shape.layers, shape.kv_heads, shape.kv_values) == (28, 2, 256)
    assert (shape.max_context, shape.dtype, shape.weight_bits) == (131072, "bfloat16", None)


def test_distill_tp1_bf16() -> None:
    figures = estimate(shape_from_config(DISTILL), spec())
    assert figures.weights == 3_554_176_000  # 1,777,088,000 * 2 B
    assert figures.kv_per_token == 28_672
    assert figures.kv_for_context == 28_672 * 131_072
    assert figures.needed == 3_554_176_000 + 2 * GIB + 3_758_096_384


@pytest.mark.parametrize(
    ("dtype", "weights", "kv_per_token", "kv_for_context"),
    [
        # /4 GPUs; KV: 14 layers per stage * 1 KV head per rank * 256 values * width
        ("bfloat16", 888_544_000, 7_168, 939_524_096),
        ("float32", 1_777_088_000, 14_336, 1_879_048_192),
    ],
)
def test_distill_tp2_pp2(dtype: str, weights: int, kv_per_token: int, kv_for_context: int) -> None:
    figures = estimate(shape_from_config(DISTILL), spec(tp=2, pp=2, engine_args={"dtype": dtype}))
    assert (figures.weights, figures.kv_per_token) == (weights, kv_per_token)
    assert (figures.context, figures.kv_for_context) == (131_072, kv_for_context)
    assert figures.dtype == dtype


def test_kv_heads_are_replicated_when_tp_exceeds_them() -> None:
    # 2 KV heads on 4 ranks: each rank still holds a whole head.
    figures = estimate(shape_from_config(DISTILL), spec(tp=4))
    assert figures.kv_per_token == 28 * 1 * 256 * 2


def test_float32_checkpoint_under_dtype_auto_loads_in_16_bits() -> None:
    figures = estimate(shape_from_config({**DISTILL, "torch_dtype": "float32"}), spec())
    assert figures.dtype == "bfloat16"
    assert figures.weights == 3_554_176_000
    assert "float32 checkpoint loaded as bfloat16" in figures.notes[0]


@pytest.mark.parametrize(
    ("backend", "args", "context"),
    [
        ("vllm", {"max-model-len": 32768}, 32768),
        ("vllm", {"max-model-len": "32k"}, 32000),
        ("vllm", {"max-model-len": "32K"}, 32768),
        ("sglang", {"context-length": 8192}, 8192),
        ("lmdeploy", {"session-len": 4096}, 4096),
        ("lmdeploy", {"context-length": 4096}, 131072),  # not LMDeploy's flag: ignored
    ],
)
def test_context_comes_from_each_engines_own_flag(
    backend: str, args: dict[str, Any], context: int
) -> None:
    assert estimate(shape_from_config(DISTILL), spec(backend, engine_args=args)).context == context


@pytest.mark.parametrize(
    ("backend", "args", "kv_per_token"),
    [
        ("vllm", {"kv-cache-dtype": "fp8"}, 14_336),
        ("sglang", {"kv-cache-dtype": "fp8_e5m2"}, 14_336),
        ("lmdeploy", {"quant-policy": 8}, 14_336),
        ("lmdeploy", {"quant-policy": 4}, 7_168),
    ],
)
def test_quantised_kv_cache(backend: str, args: dict[str, Any], kv_per_token: int) -> None:
    assert estimate(shape_from_config(DISTILL), spec(backend, engine_args=args)).kv_per_token == (
        kv_per_token
    )


def test_r1_mla_moe_fp8() -> None:
    shape = shape_from_config(R1)
    assert shape.params == 671_026_404_352
    assert (shape.is_mla, shape.kv_heads, shape.kv_values, shape.weight_bits) == (True, 1, 576, 8)
    figures = estimate(shape, spec("sglang", tp=8))
    # embedding and LM head stay bf16, the rest is FP8: (1,853,358,080*2 + 669,173,046,272) / 8
    assert figures.weights == 84_109_970_304
    # the latent is not split over TP ranks: same bytes per token on every rank
    assert figures.kv_per_token == 70_272
    assert figures.context == 163_840
    assert any("MLA" in note for note in figures.notes)


def test_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        estimate(shape_from_config(DISTILL), spec(engine_args={"dtype": "fp8"}))


def test_load_shape_reads_the_model_dir_or_config_json(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(DISTILL))
    assert not isinstance(load_shape(spec(model=str(model)), tmp_path), str)
    (tmp_path / "r1.json").write_text(json.dumps(R1))
    by_file = load_shape(spec(model="deepseek-ai/DeepSeek-R1", config_json="r1.json"), tmp_path)
    assert not isinstance(by_file, str) and by_file.is_mla


def test_hub_id_without_config_is_unknown_not_an_error(tmp_path: Path) -> None:
    shape = load_shape(spec(model="deepseek-ai/DeepSeek-R1"), tmp_path)
    assert shape == "unknown (config.json not found)"
    (tmp_path / "bad.json").write_text("{}")
    assert "cannot read" in str(load_shape(spec(config_json="bad.json"), tmp_path))
