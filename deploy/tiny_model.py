"""Build a small random-weight Qwen2 model with its own tokenizer and chat template.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a few sentences and the
weights are random, so an engine can serve real (meaningless) completions on any machine.
Run it with a Python that has transformers and tokenizers, e.g. the engine's venv:

    python deploy/tiny_model.py OUT_DIR [--heads 4 --kv-heads 2 --head-dim 128]
    python deploy/tiny_model.py OUT_DIR --think       # DeepSeek-R1 style: reasoning first
    python deploy/tiny_model.py OUT_DIR --embedding   # a BertModel, for /v1/embeddings

The defaults fit vLLM's CPU build (head_dim must be one its attention supports) and split
under TP=2 and PP=2. On GPUs use --heads 4 --kv-heads 2 --head-dim 128.
"""

import argparse
import json
from pathlib import Path

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

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "enginegate serves models behind one OpenAI-compatible endpoint.",
    "Tensor parallel and pipeline parallel split a model across devices.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > , . ; : ' \" ? !",
    'def main():\n    return {"answer": 42}\n',
    "Let me think step by step about the question before I answer it.",
]


def build_tokenizer(out: Path, vocab_size: int, think: bool) -> int:
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
    fast.chat_template = CHAT_TEMPLATE.replace("THINK", "true" if think else "false")
    fast.save_pretrained(out)
    return len(fast)


def build_model(out: Path, vocab: int, args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

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
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        eos_token_id=2,  # <|im_end|>: special tokens take ids 0.. in SPECIAL_TOKENS order
        pad_token_id=0,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))


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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.embedding:
        vocab = build_embedding(args.out, args)
    else:
        vocab = build_tokenizer(args.out, args.vocab, args.think)
        build_model(args.out, vocab, args)
    print(f"built {args.out} (vocab {vocab}, {args.layers} layers, {args.heads} heads)")


if __name__ == "__main__":
    main()
