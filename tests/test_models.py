"""Every supported family, from random-init mini configs: generate with every preset."""

import pytest
import torch

from mini_models import FAMILIES, mini_model
from xquant_fx import XQuantCache, XQuantConfig, optimize
from xquant_fx.api import cache_argument


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp_min(1e-30)).item()


def decode_logits(model, cache, ids, prompt):
    """Prefill ``prompt`` tokens, then feed the rest one at a time (teacher forcing)."""
    arg = cache_argument(model)
    out = [model(ids[:, :prompt], **{arg: cache}).logits[:, -1]]
    for t in range(prompt, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], **{arg: cache}).logits[:, -1])
    return torch.stack(out, 1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, mini_model(request.param)


def test_fp16_preset_matches_default_cache(family_model):
    family, model = family_model
    ids = torch.randint(1, 128, (2, 140), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    cache = XQuantCache(model.config, "fp16", max_batch_size=2, max_cache_len=160)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, **{cache_argument(model): cache})
    assert torch.equal(out, ref), family


# Decode-logit SQNR against the fp16 preset on random weights, 170 prompt + 30 decoded tokens.
# Floors sit a few dB under the lowest family's measurement (printed by -s). Random layers are
# uncorrelated, so cross-layer sharing is near its worst here; the real-model test holds it tighter.
SQNR_FLOOR_DB = {"kivi-4": 30.0, "kivi-2": 18.0, "asymkv-1.5": 10.0, "xquant-1.38": 4.0}


def test_quantized_presets_stay_close_to_fp16(family_model):
    family, model = family_model
    ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(model, XQuantCache(model.config, "fp16", max_cache_len=200), ids, 170)
    for preset, floor in SQNR_FLOOR_DB.items():
        got = decode_logits(model, XQuantCache(model.config, preset, max_cache_len=200), ids, 170)
        db = sqnr_db(ref, got)
        print(f"{family} {preset}: {db:.1f} dB")
        assert db > floor, (family, preset, db)
        assert not torch.equal(got, ref)  # the quantized past is really read


def test_left_padded_batch_and_sampling():
    model = mini_model("llama")
    arg = cache_argument(model)
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(1, 128, (1, 150), generator=g), torch.randint(1, 128, (1, 90), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 60, dtype=torch.long), short], 1)])
    mask = (torch.arange(150) >= torch.tensor([[0], [60]])).long()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    ref = model.generate(ids, **kw)
    fp = model.generate(ids, **kw, **{arg: XQuantCache(model.config, "fp16", max_batch_size=2, max_cache_len=160)})
    assert torch.equal(fp, ref)
    q = model.generate(ids, **kw, **{arg: XQuantCache(model.config, "kivi-4", max_batch_size=2, max_cache_len=160)})
    alone = model.generate(short, max_new_tokens=10, do_sample=False,
                           **{arg: XQuantCache(model.config, "kivi-4", max_cache_len=100)})
    assert q.shape == ref.shape
    assert (q[1, 150:] == alone[0, 90:]).float().mean() >= 0.8  # padding only moves group statistics
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20,
                             **{arg: XQuantCache(model.config, "xquant-1.38", max_batch_size=2, max_cache_len=160)})
    assert sampled.shape == (2, 160)


def test_optimize_generates_and_refuses_twice():
    model = mini_model("qwen3")
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    optimize(model, "fp16")
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref)
    with pytest.raises(ValueError, match="already optimized"):
        optimize(model)
    compiled = torch.compile(mini_model("llama"))
    with pytest.raises(ValueError, match="already compiled"):
        optimize(compiled)


def test_optimize_preallocated_cache_is_reused_and_bounded():
    model = optimize(mini_model("llama"), "kivi-2", max_cache_len=64, max_batch_size=1)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    a = model.generate(ids, max_new_tokens=8, do_sample=False)
    b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_cache_len=64"):
        model.generate(ids, max_new_tokens=30)
    with pytest.raises(ValueError, match="max_batch_size=1"):
        model.generate(ids.repeat(2, 1), max_new_tokens=4)


def test_unsupported_model_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=32, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        optimize(t5)
    with pytest.raises(ValueError, match="config must be an XQuantConfig"):
        optimize(mini_model("llama"), config=3)


def test_optimize_passes_quality_options_through(monkeypatch):
    """sink_tokens / rotation / level_fit reach the cache optimize builds, and its compiled greedy
    tokens equal eager decoding with an XQuantCache of the same config (the prompt is long enough
    for tokens to leave the window and be quantized)."""
    spec = "xquant-1.38:sink_tokens=4,rotation=hadamard,level_fit=lsq,eta=none"
    model = mini_model("llama", num_hidden_layers=2)
    ids = torch.randint(1, 128, (1, 170), generator=torch.Generator().manual_seed(6))
    cache = XQuantCache(model.config, spec, max_cache_len=178)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, **{cache_argument(model): cache})
    import xquant_fx.api

    built = []

    class Recording(XQuantCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(xquant_fx.api, "XQuantCache", Recording)
    optimized = optimize(model, spec, max_cache_len=178, max_batch_size=1)
    assert torch.equal(optimized.generate(ids, max_new_tokens=8, do_sample=False), ref)
    assert built and all(c.xquant_config == cache.xquant_config for c in built)
    layer = built[-1].layers[0]  # the pool's cache (the first is optimize's unallocated config check)
    assert (layer.S, layer.rotation, layer.fit) == (4, "hadamard", "lsq") and "k_sink" in layer.storage
