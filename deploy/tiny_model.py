"""Build a small random-weight Qwen2 model with its own tokenizer and chat template.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a few sentences and the
weights are random, so an engine can serve real (meaningless) completions on any machine.
Run it with a Python that has transformers and tokenizers, e.g. the engine's venv:

    python deploy/tiny_model.py OUT_DIR [--heads 4 --kv-heads 2 --head-dim 128]
    python deploy/tiny_model.py OUT_DIR --think       # DeepSeek-R1 style: reasoning first
    python deploy/tiny_model.py OUT_DIR --embedding   # a BertModel, for /v1/embeddings
    python deploy/tiny_model.py OUT_DIR --deepseek    # DeepseekV3ForCausalLM (MLA + MoE), R1 chat
    python deploy/tiny_model.py OUT_DIR --terse --max-len 131072  # always answers "Hello!"

The defaults fit vLLM's CPU build (head_dim must be one its attention supports) and split
under TP=2 and PP=2. On GPUs use --heads 4 --kv-heads 2 --head-dim 128.
"""

import argparse
import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
THINK_TOKENS = SPECIAL_TOKENS[3:]

# ChatML, as Qwen2 and the DeepSeek-R1 Qwen distills use it. With --think the generation prompt
# opens a <think> block, as DeepSeek-R1's template does, so the output is reasoning first.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if THINK %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
# With --terse the tools come first, one JSON schema a line, as Qwen2.5 lists them in its
# system turn: an agent's tools are most of its prompt, and the context must hold them.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' }}"
    "{% for tool in tools %}{{ tool | tojson + '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
)

# DeepSeek-R1's own special tokens and its chat template, shortened: the system prompt goes
# first, no tool turns. The prompt ends `<｜Assistant｜><think>\n` as R1's does.
R1_SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
]
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + (message['content'] or '') + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "enginegate serves models behind one OpenAI-compatible endpoint.",
    "Tensor parallel and pipeline parallel split a model across devices.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > , . ; : ' \" ? !",
    'def main():\n    return {"answer": 42}\n',
    "Let me think step by step about the question before I answer it.",
]


def build_tokenizer(out: Path, vocab_size: int, think: bool, tools: bool = False) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # DeepSeek-R1's tokenizer has <think> and </think> as plain (not special) added tokens, so
    # they stay in the output text; engines' reasoning parsers look for them there.
    special = SPECIAL_TOKENS[:3] if think else SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if think:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[SPECIAL_TOKENS[1], *special[3:]],
    )
    fast.chat_template = (TOOLS_TEMPLATE if tools else "") + CHAT_TEMPLATE.replace(
        "THINK", "true" if think else "false"
    )
    fast.save_pretrained(out)
    return len(fast)


def build_r1_tokenizer(out: Path, vocab_size: int) -> int:
    """A byte-level BPE with DeepSeek-R1's special tokens and chat template (ids 0-3: BOS, EOS,
    User, Assistant; then <think> and </think> as plain added tokens, as in R1's tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=R1_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=R1_SPECIAL_TOKENS[0],
        eos_token=R1_SPECIAL_TOKENS[1],
        pad_token=R1_SPECIAL_TOKENS[1],
        additional_special_tokens=R1_SPECIAL_TOKENS[2:],
    )
    fast.chat_template = R1_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def build_model(out: Path, vocab: int, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=args.heads * args.head_dim,
        head_dim=args.head_dim,
        intermediate_size=args.heads * args.head_dim * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_len,
        tie_word_embeddings=not args.terse,
        torch_dtype="bfloat16",
        eos_token_id=2,  # <|im_end|>: special tokens take ids 0.. in SPECIAL_TOKENS order
        pad_token_id=0,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if args.terse:
        make_terse(model, AutoTokenizer.from_pretrained(out).encode(TERSE_REPLY), eos=2)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))


TERSE_REPLY = "Hello!"


def make_terse(model: Any, reply: list[int], eos: int) -> None:
    """Turn `model` into a bigram model that answers `reply`, then EOS, whatever it is asked
    and however it samples: agents' CLIs (Claude Code, Codex) wait for the end of a turn, which
    random weights never reach, and may sample at temperature 1.

    With every attention o_proj and MLP down_proj zero, the residual stream stays the current
    token's embedding. Every token embeds as dim 0, except reply token i as dim i + 1; the final
    RMSNorm scales each to sqrt(hidden), and lm_head maps dim 0 to reply[0], dim i + 1 to
    reply[i + 1] (EOS after the last): the winner's logit is 8 * sqrt(hidden) (90 at hidden
    128), every other token's 0.
    """
    import torch

    hidden = model.config.hidden_size
    assert len(set(reply)) == len(reply) < hidden and eos not in reply, f"reply tokens {reply}"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        for i, (token, after) in enumerate(zip(reply, [*reply[1:], eos], strict=True)):
            embed[token] = 0.0
            embed[token, i + 1] = 1.0
            head[after, i + 1] = 8.0
        head[reply[0], 0] = 8.0
        model.model.norm.weight.fill_(1.0)


# DeepSeek-V3's per-head sizes. Engines' MLA kernels are built for exactly these (the latent the
# KV cache holds is kv_lora_rank + qk_rope_head_dim = 576 values: vLLM's CPU_MLA decode kernel
# accepts only that, SGLang's triton decode 576 or 288, FA3's prefill q/k 192 with v 128); see
# shared/reviews/gpu-deepseek-sglang-2026-12.md. Only width, depth, heads and experts shrink.
MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}


def deepseek_config(vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    """config.json as DeepSeek-V3/R1 ship it (keys engines read as attributes included), shrunk:
    layer 0 dense, the rest MoE with `args.experts` routed experts (top 2) and one shared."""
    hidden = args.heads * 128
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "moe_intermediate_size": hidden // 2,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "q_lora_rank": hidden // 2,
        **MLA,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": args.experts,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "ep_size": 1,
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_len,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def deepseek_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint in the original DeepSeek-V3 layout (one tensor per expert),
    which every engine's loader maps from."""
    h, heads, vocab = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kv_rank, q_rank = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_a_proj.weight": (q_rank, h),
            p + "self_attn.q_a_layernorm.weight": (q_rank,),
            p + "self_attn.q_b_proj.weight": (heads * qk, q_rank),
            p + "self_attn.kv_a_proj_with_mqa.weight": (kv_rank + cfg["qk_rope_head_dim"], h),
            p + "self_attn.kv_a_layernorm.weight": (kv_rank,),
            p + "self_attn.kv_b_proj.weight": (
                heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]),
                kv_rank,
            ),
            p + "self_attn.o_proj.weight": (h, heads * cfg["v_head_dim"]),
        }
        if i < cfg["first_k_dense_replace"]:
            shapes |= _mlp(p + "mlp.", h, cfg["intermediate_size"])
            continue
        shapes |= {
            p + "mlp.gate.weight": (cfg["n_routed_experts"], h),
            p + "mlp.gate.e_score_correction_bias": (cfg["n_routed_experts"],),
        }
        for e in range(cfg["n_routed_experts"]):
            shapes |= _mlp(f"{p}mlp.experts.{e}.", h, cfg["moe_intermediate_size"])
        shared = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
        shapes |= _mlp(p + "mlp.shared_experts.", h, shared)
    return shapes


def _mlp(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (inner, hidden),
        prefix + "up_proj.weight": (inner, hidden),
        prefix + "down_proj.weight": (hidden, inner),
    }


def build_deepseek(out: Path, args: argparse.Namespace) -> int:
    """A random-weight DeepseekV3ForCausalLM (MLA + MoE) with R1's template: norms 1, the router
    bias 0 in float32 (as DeepSeek ships it), every other weight N(0, 0.02) in bf16."""
    import torch
    from safetensors.torch import save_file

    vocab = build_r1_tokenizer(out, args.vocab)
    cfg = deepseek_config(vocab, args)
    torch.manual_seed(args.seed)
    tensors = {}
    for name, shape in deepseek_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return vocab


def build_embedding(out: Path, args: argparse.Namespace) -> int:
    """A random BertModel with a WordPiece tokenizer: vLLM serves it as an embedding model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=args.vocab, special_tokens=specials)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=args.max_len)
    fast.save_pretrained(out)
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=args.heads * args.head_dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.heads * args.head_dim * 2,
        max_position_embeddings=args.max_len,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(out, safe_serialization=True)
    return len(fast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=520)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--think", action="store_true", help="open a <think> block in the prompt")
    parser.add_argument("--embedding", action="store_true", help="a BertModel for embeddings")
    parser.add_argument(
        "--deepseek", action="store_true", help="DeepseekV3ForCausalLM (MLA + MoE), R1 template"
    )
    parser.add_argument("--experts", type=int, default=4, help="routed experts (--deepseek)")
    parser.add_argument(
        "--terse",
        action="store_true",
        help=f"answer {TERSE_REPLY!r} to everything, then stop; tools in the prompt",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.embedding:
        vocab = build_embedding(args.out, args)
    elif args.deepseek:
        vocab = build_deepseek(args.out, args)
    else:
        vocab = build_tokenizer(args.out, args.vocab, args.think, tools=args.terse)
        build_model(args.out, vocab, args)
    print(f"built {args.out} (vocab {vocab}, {args.layers} layers, {args.heads} heads)")


if __name__ == "__main__":
    main()
