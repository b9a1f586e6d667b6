"""Random-init mini configs of real transformers architectures (no downloads)."""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
)

# name -> (config class, model class, extra config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 64, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"head_dim": None, "pad_token_id": 0}),
}


def mini_config(family: str, **overrides):
    config_cls, _, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    if kwargs.get("head_dim") is None:
        kwargs.pop("head_dim")
    return getattr(transformers, config_cls)(**kwargs)


def mini_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    config = mini_config(family, **overrides)
    model = getattr(transformers, FAMILIES[family][1])(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model
