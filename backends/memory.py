"""How much GPU memory one replica needs, from the model's config.json and the engine flags.

Per GPU of a replica of tp*pp GPUs:

    weights   = parameters * bytes per parameter / (tp*pp)
    KV/token  = ceil(layers/pp) * ceil(kv_heads/tp) * 2 * head_dim * KV bytes   (K and V)
    needed    = weights + overhead + KV/token * context

Multi-head latent attention (DeepSeek V2/V3/R1: `kv_lora_rank` in config.json) caches one
latent of kv_lora_rank + qk_rope_head_dim values per token and layer, not K and V per head, and
every TP rank holds all of it. Approximations, all small against the totals: PP stages are
taken as even (the first also holds the embedding, the last the LM head); norms, biases and
FP8 block scales are counted at the weight width or left out; DeepSeek's multi-token-prediction
layer is left out (loaded only for speculative decoding); `overhead` stands for the CUDA
context, NCCL buffers, activations and CUDA graphs.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.spec import EngineArg, ModelSpec

GIB = 1024**3
OVERHEAD_BYTES = 2 * GIB
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json."""

    params: int  # without the multi-token-prediction layer
    embedding_params: int  # input embedding and LM head: never quantised
    layers: int
    kv_heads: int  # 1 with MLA: the latent is shared by all heads and all TP ranks
    kv_values: int  # per KV head, token and layer: 2*head_dim, or the MLA latent width
    max_context: int
    dtype: str  # the checkpoint's torch_dtype
    weight_bits: int | None  # quantised linear layers (fp8: 8, AWQ/GPTQ: bits)
    is_mla: bool = False


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU of one replica, and what was assumed to get them."""

    weights: int
    kv_per_token: int
    context: int
    overhead: int
    dtype: str  # activations, and weights unless quantised
    weight_bits: int | None = None
    is_mla: bool = False
    notes: tuple[str, ...] = ()

    @property
    def kv_for_context(self) -> int:
        return self.kv_per_token * self.context

    @property
    def needed(self) -> int:
        return self.weights + self.overhead + self.kv_for_context


@dataclass(frozen=True)
class Budget:
    """What an engine takes on each GPU of a replica, by its own rule (its adapter's
    `memory_budget`); byte figures are per GPU."""

    total: int  # for weights (+ overhead) + KV cache
    rule: str  # how `total` was reached, for the plan table
    kv_room: int  # what is left of it for the KV cache
    problem: str = ""  # why the engine refuses to start whatever the KV cache needs


def load_shape(spec: ModelSpec, base_dir: Path) -> ModelShape | str:
    """The shape, or why there is none (a message for the plan table)."""
    if spec.config_json:
        path = Path(spec.config_json).expanduser()
        path = path if path.is_absolute() else base_dir / path
    else:
        path = Path(str(spec.model)).expanduser() / "config.json"
    try:
        return shape_from_config(json.loads(path.read_text()))
    except OSError:
        return "unknown (config.json not found)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unknown ({path.name}: cannot read {exc})"


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    embedding = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    if cfg.get("kv_lora_rank"):
        attention, kv_heads = _mla_params(cfg, hidden, heads), 1
        kv_values = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    else:
        head_dim = cfg.get("head_dim") or hidden // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        attention = _gqa_params(cfg, hidden, heads, kv_heads, head_dim)
        kv_values = 2 * head_dim
    per_layer = attention + 2 * hidden  # two norms
    body = sum(per_layer + _mlp_params(cfg, hidden, layer) for layer in range(layers))
    quant = cfg.get("quantization_config") or {}
    bits = 8 if quant.get("quant_method") == "fp8" else quant.get("bits")
    return ModelShape(
        params=embedding + body + hidden,
        embedding_params=embedding,
        layers=layers,
        kv_heads=kv_heads,
        kv_values=kv_values,
        max_context=cfg.get("max_position_embeddings") or 4096,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        weight_bits=int(bits) if bits else None,
        is_mla=bool(cfg.get("kv_lora_rank")),
    )


def _gqa_params(cfg: dict[str, Any], hidden: int, heads: int, kv_heads: int, dim: int) -> int:
    q_out, kv_out = heads * dim, kv_heads * dim
    # Qwen2 has q/k/v biases without saying so; Llama-style configs say `attention_bias`.
    bias = q_out + 2 * kv_out if cfg.get("attention_bias", cfg.get("model_type") == "qwen2") else 0
    return hidden * (q_out + 2 * kv_out) + q_out * hidden + bias


def _mla_params(cfg: dict[str, Any], hidden: int, heads: int) -> int:
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_rank, q_rank = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    q_head = heads * (nope + rope)
    q = hidden * q_rank + q_rank + q_rank * q_head if q_rank else hidden * q_head
    kv = hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
    return q + kv + heads * v_dim * hidden


def _mlp_params(cfg: dict[str, Any], hidden: int, layer: int) -> int:
    """Gated MLP (three matrices); MoE layers add routed and shared experts and a router."""
    experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    if not experts or layer < cfg.get("first_k_dense_replace", 0):
        return 3 * hidden * cfg["intermediate_size"]
    width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    shared = cfg.get("n_shared_experts", 0) * width + cfg.get("shared_expert_intermediate_size", 0)
    return 3 * hidden * (experts * width + shared) + hidden * experts


def estimate(shape: ModelShape, spec: ModelSpec, context_flag: str | None) -> Estimate:
    """Per-GPU figures for one replica of `spec`; `context_flag` is the engine arg that sets
    the context length (the adapter's), None: the model's own."""
    args = spec.engine_args
    dtype, notes = _dtype(shape, args.get("dtype")), []
    if str(args.get("dtype", "auto")) == "auto" and shape.dtype == "float32":
        notes.append("float32 checkpoint loaded as bfloat16 (dtype auto)")
    act = DTYPE_BYTES[dtype]
    quantised = shape.params - shape.embedding_params
    weights = shape.embedding_params * act + quantised * (shape.weight_bits or act * 8) // 8
    kv_bytes = _kv_bytes(args, act)
    layers = math.ceil(shape.layers / spec.pp)
    heads = math.ceil(shape.kv_heads / spec.tp)
    if shape.is_mla:
        notes.append("MLA: one latent per token and layer, held whole by every TP rank")
    context = _context(args.get(context_flag) if context_flag else None, shape.max_context)
    return Estimate(
        weights=math.ceil(weights / spec.ranks),
        kv_per_token=math.ceil(layers * heads * shape.kv_values * kv_bytes),
        context=context,
        overhead=OVERHEAD_BYTES,
        dtype=dtype,
        weight_bits=shape.weight_bits,
        is_mla=shape.is_mla,
        notes=tuple(notes),
    )


def _dtype(shape: ModelShape, asked: Any) -> str:
    name = str(asked or "auto").removeprefix("torch.")
    if name == "auto":
        name = shape.dtype.removeprefix("torch.")
        # vLLM, SGLang and LMDeploy all load float32 checkpoints in 16 bits under "auto".
        return "bfloat16" if name in ("float32", "float") else name
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPE_BYTES)} or auto")
    return name


def _kv_bytes(args: dict[str, Any], act: int) -> float:
    """vLLM/SGLang `kv-cache-dtype`, LMDeploy `quant-policy` (4 or 8 bit)."""
    kv = str(args.get("kv-cache-dtype", "auto"))
    if kv.startswith("fp8") or kv == "int8" or args.get("quant-policy") == 8:
        return 1
    if kv.startswith("fp4") or args.get("quant-policy") == 4:
        return 0.5
    return act


def _context(asked: Any, model_max: int) -> int:
    """`32768`, `32k` (1000s) or `32K` (1024s), as vLLM reads them; -1 or none: the model's."""
    if asked is None or str(asked) in ("-1", "auto"):
        return model_max
    text = str(asked)
    scale = {"k": 1000, "m": 1000**2, "K": 1024, "M": 1024**2}.get(text[-1], 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def arg_number(args: Mapping[str, EngineArg], key: str, default: float) -> float:
    """An engine arg read as a number (`0.9` or `"0.9"`), `default` when unset."""
    value = args.get(key)
    return default if value is None else float(value)


def format_gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
