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


# MoE families: name -> (config class, model class, extra config kwargs). 8 routed experts, top-4
# (Mixtral top-2), 3 layers; DeepSeek's first layer dense.
_MOE_COMMON = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
_DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=32,
                 first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=32,
                 qk_nope_head_dim=32, v_head_dim=32, num_key_value_heads=4, routed_scaling_factor=2.5)
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, head_dim=32, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, head_dim=32,
                       decoder_sparse_step=1, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(_DEEPSEEK, topk_method="greedy")),
    "deepseek_v2_group": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                          dict(_DEEPSEEK, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DEEPSEEK, n_group=4, topk_group=2, norm_topk_prob=True)),
}


def mini_moe_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """Random-init mini MoE model; router weights scaled up so that routing is decisive."""
    config_cls, model_cls, extra = MOE_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**_MOE_COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            elif "experts" in name and p.dim() == 3:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    model.generation_config.pad_token_id = 0
    return model
