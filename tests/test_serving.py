"""Serving from one optimized model: a bounded number of compiles for any mix of prompt lengths
and batch sizes, a cache pool that grows instead of failing, chunked prefill, reads that follow
the prompt rather than the capacity, and errors at the call that takes a bad value."""

import random
import warnings

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from transformers import T5Config

from mini_models import mini_config, mini_model
from xquant_fx import XQuantCache, optimize, quant
from xquant_fx.api import MIN_POOL_LENGTH, CachePool, cache_argument

MAX_LEN, MAX_BATCH, NEW = 48, 4, 3


def _compiles() -> int:
    return dynamo_utils.counters["stats"]["unique_graphs"]


def _eager(model, ids, preset, new=NEW, **kwargs):
    cache = XQuantCache(model.config, preset, max_batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new)
    return model.generate(ids, max_new_tokens=new, do_sample=False, **{cache_argument(model): cache}, **kwargs)


def test_two_hundred_calls_of_any_shape_compile_at_most_twice():
    """A server's loop: 200 generate calls, random prompt lengths (1..max) and batch sizes
    (1..max), on one model with a preallocated cache: one graph for a single sequence, one
    (dynamic in the batch) for every other batch size, tokens equal to the eager cache's."""
    model = mini_model("llama", num_hidden_layers=1)
    reference = mini_model("llama", num_hidden_layers=1)
    optimize(model, "kivi-2", compile=True, max_cache_len=MAX_LEN, max_batch_size=MAX_BATCH)
    rng = random.Random(0)
    before = _compiles()
    for call in range(200):
        batch, prompt = rng.randint(1, MAX_BATCH), rng.randint(1, MAX_LEN - NEW)
        ids = torch.randint(3, 128, (batch, prompt), generator=torch.Generator().manual_seed(call))
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        if call % 20 == 0 or call < 4:
            assert torch.equal(out, _eager(reference, ids, "kivi-2")), (call, batch, prompt)
    assert _compiles() - before <= 2
    assert model.xquant_cache_pool.allocations == 1


def test_pool_grows_in_powers_of_two_and_refuses_past_fixed_sizes():
    made = []
    pool = CachePool(lambda b, t: made.append((b, t)) or _FakeCache(b, t), max_batch_size=None, max_cache_len=None)
    pool.get(1, 10)
    pool.get(1, 200)      # fits: reused
    pool.get(3, 300)      # grows both
    pool.get(2, 40)       # fits
    assert made == [(1, MIN_POOL_LENGTH), (4, 512)]
    assert pool.cache.resets == 1
    fixed = CachePool(lambda b, t: _FakeCache(b, t), max_batch_size=2, max_cache_len=100)
    assert (fixed.get(1, 5).max_batch_size, fixed.cache.max_cache_len) == (2, 100)
    with pytest.raises(ValueError, match="max_cache_len=100"):
        fixed.get(1, 101)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        fixed.get(3, 5)


class _FakeCache:
    def __init__(self, b, t):
        self.max_batch_size, self.max_cache_len, self.resets = b, t, 0

    def reset(self):
        self.resets += 1


def test_models_do_not_share_a_recompile_budget_and_the_limit_falls_back_to_eager(monkeypatch):
    """Each optimized model compiles a function of its own (Dynamo counts recompiles per code
    object), and a step past the recompile limit runs eagerly with a warning instead of failing."""
    a, b = mini_model("llama", num_hidden_layers=1), mini_model("llama", num_hidden_layers=1)
    optimize(a, "kivi-2", compile=True)
    optimize(b, "kivi-2", compile=True)
    assert a.get_compiled_call(None).compiled is not b.get_compiled_call(None).compiled
    b = mini_model("llama", num_hidden_layers=1)  # the reference: same weights, not optimized
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.generate(ids, max_new_tokens=NEW, do_sample=False), _eager(b, ids, "kivi-2"))
    long_ids = torch.randint(3, 128, (1, MIN_POOL_LENGTH + 10), generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="recompile limit"):
        out = a.generate(long_ids, max_new_tokens=NEW, do_sample=False)  # the pool grew: a new shape
    assert torch.equal(out, _eager(b, long_ids, "kivi-2"))


def test_chunked_prefill_matches_one_call_within_the_window():
    """Chunks that stay inside the full-precision window see exactly what a one-call prefill
    sees; optimize() chunks by default and a generate argument overrides it."""
    model = optimize(mini_model("qwen3", num_hidden_layers=2), "xquant-1.38", prefill_chunk_size=16)
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(2))
    chunked = model.generate(ids, max_new_tokens=6, do_sample=False)
    whole = model.generate(ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=None)
    assert torch.equal(chunked, whole)


def test_chunked_prefill_beyond_the_window_stores_what_token_by_token_stores():
    """A prompt prefilled in chunks leaves the same storage as the same prompt fed whole (the
    store rule does not depend on how the prompt is cut)."""
    model = mini_model("llama", num_hidden_layers=2)
    arg = cache_argument(model)
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    caches = [XQuantCache(model.config, "kivi-2", max_cache_len=320) for _ in range(2)]
    with torch.no_grad():
        model(ids, **{arg: caches[0]})
        for chunk in ids.split(64, dim=1):
            model(chunk, **{arg: caches[1]})
    # keys / values stored from the same inputs are equal; the chunked run's later layers saw
    # quantized context, so compare the first layer, whose inputs are the embeddings alone
    first = [c.layers[0] for c in caches]
    for name in first[0].storage:
        assert torch.equal(first[0].storage[name], first[1].storage[name]), name


@pytest.mark.parametrize("n", [1, 31, 33, 130, 161, 300])
def test_read_stored_equals_the_reference_read(n):
    """The eager read (block by block, only what is stored) is exactly the reference read's
    first n positions, for quantized, shared and float8-metadata layers."""
    model = mini_model("llama", num_hidden_layers=2)
    for preset in ("xquant-1.38", "kivi-2:metadata_dtype=float8_e4m3fn"):
        cache = XQuantCache(model.config, preset, max_batch_size=2, max_cache_len=320)
        with torch.no_grad():
            model(torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(n)), **{cache_argument(model): cache})
        for layer in cache.layers:
            full_k, full_v = layer.read(2, n)
            assert torch.equal(layer.read_stored("k", 2, n), full_k[:, :, :n]), (preset, layer.plan)
            assert torch.equal(layer.read_stored("v", 2, n), full_v[:, :, :n]), (preset, layer.plan)


def test_eager_reads_follow_the_prompt_not_the_capacity(monkeypatch):
    """A short prompt into a cache of a million positions: no read dequantizes the capacity
    (the reference full read is never called), and the prefill attends over the prompt only."""
    model = mini_model("llama", num_hidden_layers=1)
    cache = XQuantCache(model.config, "kivi-2", max_cache_len=1 << 20)
    monkeypatch.setattr(quant, "read_keys", _refuse)
    monkeypatch.setattr(quant, "read_values", _refuse)
    seen = []
    layer = cache.layers[0]
    original = type(layer)._prefill
    monkeypatch.setattr(type(layer), "_prefill", lambda self, k, v: seen.append(original(self, k, v)) or seen[-1])
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)), **{cache_argument(model): cache})
    assert seen[0][0].shape[2] == 5 and seen[0][1].shape[2] == 5


def _refuse(*args, **kwargs):
    raise AssertionError("an eager forward read the whole capacity")


def test_short_caches_cost_what_sixteen_bits_cost():
    """max_cache_len <= residual_length never quantizes: the layers stay whole, no window."""
    config = mini_config("llama")
    short = XQuantCache(config, "xquant-1.38", max_cache_len=100).memory_report(torch.bfloat16)
    assert short["stored_bits"] == 16 and short["bytes"] == short["bf16_bytes"]
    model = mini_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    got = model.generate(ids, max_new_tokens=8, do_sample=False,
                         **{cache_argument(model): XQuantCache(model.config, "xquant-1.38", max_cache_len=40)})
    assert torch.equal(got, model.generate(ids, max_new_tokens=8, do_sample=False))


def test_cache_refuses_encoder_decoder_configs():
    with pytest.raises(ValueError, match="encoder-decoder"):
        XQuantCache(T5Config(d_model=32, d_ff=32, num_layers=1, num_heads=2, d_kv=16, vocab_size=64), max_cache_len=64)


def test_device_given_without_an_index_matches_the_tensors():
    """``device="cpu:0"`` (like ``"cuda"`` against ``cuda:0``) names the device the key states
    report differently: the cache keeps the device its storage landed on."""
    model = mini_model("llama", num_hidden_layers=1)
    for device in ("cpu:0", torch.device("cpu"), "cpu"):
        cache = XQuantCache(model.config, "kivi-2", max_cache_len=64, device=device, dtype=torch.float32)
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 9)), **{cache_argument(model): cache})
        assert cache.layers[0].device == torch.device("cpu")


@pytest.mark.parametrize("kwargs, match", [
    ({"max_cache_len": -5}, "max_cache_len must be a positive int"),
    ({"max_batch_size": 0}, "max_batch_size must be a positive int"),
    ({"max_cache_len": True}, "max_cache_len must be a positive int"),
    ({"mode": "bogus"}, "mode='bogus'"),
    ({"prefill_chunk_size": 0}, "prefill_chunk_size must be a positive int"),
])
def test_optimize_refuses_bad_arguments_at_the_call(kwargs, match):
    model = mini_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match=match):
        optimize(model, "kivi-2", **kwargs)
    assert not getattr(model, "_xquant_optimized", False)


def test_optimize_checks_head_dims_at_the_call():
    model = mini_model("llama", num_hidden_layers=1, head_dim=80)
    with pytest.raises(ValueError, match="head_dim 80 is not a multiple of group_size 32"):
        optimize(model, "kivi-2")


def test_max_cache_len_alone_serves_growing_batches():
    model = optimize(mini_model("llama", num_hidden_layers=1), "kivi-2", max_cache_len=64)
    ids = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (3, 24)
    assert (model.xquant_cache_pool.cache.max_batch_size, model.xquant_cache_pool.cache.max_cache_len) == (4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids[:1], max_new_tokens=4, do_sample=False)


def test_moe_pruning_applies_to_decode_steps_only():
    """``moe_top_k`` prunes the compiled decode step; a plain forward (and a prompt) keeps the
    model's own top-k, as optimize's docstring and the README say."""
    from mini_models import mini_moe_model

    from xquant_fx import XQuantConfig

    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    model = mini_moe_model("qwen3_moe")
    with torch.no_grad():
        own = model(ids).logits
        optimize(model, XQuantConfig.preset("kivi-2").replace(moe_top_k=1))
        after = model(ids).logits
    assert torch.allclose(after, own, atol=1e-5, rtol=1e-4)
