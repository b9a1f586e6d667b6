"""The strong bf16 baseline (``benchmarks/bf16_baseline.py``) is exact: its decode attention over a
static cache gives transformers' default sdpa results, without expanding the GQA heads.

A mini Llama (4 query heads over 2 KV heads) in float32 on CPU; the static cache holds more slots
than the run writes, so a decode step that attended to the unwritten slots would differ.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from mini_models import mini_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bf16_baseline  # noqa: E402
from bf16_baseline import ATTN_NAME, restore_attention, strong_bf16_attention, use_strong_bf16_attention  # noqa: E402

CACHE_LEN = 48
NEW = 12


@pytest.fixture(scope="module")
def model():
    return mini_model("llama", num_hidden_layers=2)


def prompt(length, batch=2, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, cache):
    """Greedy tokens and the logits of every decode step, fed one token at a time."""
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        tokens = [logits[-1].argmax(-1)]
        for i in range(NEW - 1):
            pos = torch.tensor([ids.shape[1] + i])
            out = model(tokens[-1][:, None], past_key_values=cache, use_cache=True, position_ids=pos[None],
                        cache_position=pos)
            logits.append(out.logits[:, -1])
            tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def static_cache(model, batch=2):
    return StaticCache(config=model.config, max_cache_len=CACHE_LEN, max_batch_size=batch)


@pytest.fixture
def switched(model):
    previous = model.config._attn_implementation
    assert previous == "sdpa"
    yield use_strong_bf16_attention(model)
    restore_attention(model, previous)


def test_static_cache_tokens_and_logits_equal_default_sdpa(model, switched, monkeypatch):
    ids = prompt(9)
    restore_attention(model)
    ref_tokens, ref_logits = greedy(model, ids, static_cache(model))

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), None if attn_mask is None else tuple(attn_mask.shape),
                      kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    assert use_strong_bf16_attention(model) == ATTN_NAME == model.config._attn_implementation
    monkeypatch.setattr(bf16_baseline.F, "scaled_dot_product_attention", spy)
    tokens, logits = greedy(model, ids, static_cache(model))
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # (F is torch.nn.functional itself: transformers' own prefill calls are recorded too.) Every
    # decode step of both layers went through the grouped path: the 2 query heads of each KV head
    # as 2 rows, the full static cache of 2 KV heads (not expanded to 4), the boolean mask.
    decode = [c for c in calls if c[0][2] != ids.shape[1]]
    assert len(decode) == 2 * (NEW - 1)
    assert set(decode) == {((2, 2, 2, 64), (2, 2, CACHE_LEN, 64), (2, 1, 1, CACHE_LEN), False)}


def test_attending_to_unwritten_slots_would_differ(model, switched):
    """The check above can fail: dropping the mask (all 48 static slots, 38+ of them unwritten)
    moves the logits far off."""
    ids = prompt(9, seed=1)
    _, ref_logits = greedy(model, ids, static_cache(model))

    def no_mask(module, query, key, value, attention_mask, **kwargs):
        return strong_bf16_attention(module, query, key, value, None if query.shape[2] == 1 else attention_mask,
                                     **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, no_mask)
    try:
        _, logits = greedy(model, ids, static_cache(model))
    finally:
        AttentionInterface.register(ATTN_NAME, strong_bf16_attention)
    assert (logits[:, 1:] - ref_logits[:, 1:]).abs().max() > 1e-2


def test_dynamic_cache_is_mask_free_gqa(model, switched, monkeypatch):
    """With a dynamic cache every stored slot is valid: transformers passes no mask at decode, and
    the step is the mask-free enable_gqa call; tokens equal the default path's."""
    ids = prompt(6, seed=2)
    restore_attention(model)
    ref_tokens, ref_logits = greedy(model, ids, DynamicCache(config=model.config))
    use_strong_bf16_attention(model)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask is None, kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(bf16_baseline.F, "scaled_dot_product_attention", spy)
    tokens, logits = greedy(model, ids, DynamicCache(config=model.config))
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    decode = [c for c in calls if c[0][2] == 1]  # prefill calls are transformers' own (F is torch's)
    assert len(decode) == 2 * (NEW - 1) and set(decode) == {((2, 4, 1, 64), True, True)}


def test_decode_step_compiles_in_one_graph(model, switched):
    """No graph break in a static-cache decode step (what reduce-overhead captures as one CUDA graph)."""
    ids = prompt(5, seed=3)
    cache = static_cache(model)
    with torch.no_grad():
        token = model(ids, past_key_values=cache).logits[:, -1].argmax(-1)
        pos = torch.tensor([ids.shape[1]])
        torch._dynamo.reset()
        step = torch.compile(model, backend="eager", fullgraph=True)
        got = step(token[:, None], past_key_values=cache, position_ids=pos[None], cache_position=pos).logits
    torch._dynamo.reset()
    ref_cache = static_cache(model)
    restore_attention(model)
    with torch.no_grad():
        model(ids, past_key_values=ref_cache)
        ref = model(token[:, None], past_key_values=ref_cache, position_ids=pos[None], cache_position=pos).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_refuses_what_is_not_a_transformers_model():
    with pytest.raises(ValueError, match="not a transformers model"):
        use_strong_bf16_attention(torch.nn.Linear(4, 4))
