"""XQuantCache semantics on synthetic K/V streams (no model): storage, reads, sharing, memory, errors."""

import math

import pytest
import torch
from transformers import LlamaConfig

from xquant_fx import XQuantCache, XQuantConfig, quant

H, D = 2, 64


def llama_config(layers=4):
    return LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=H, head_dim=D,
    )


def make_cache(xq="kivi-2", layers=4, batch=2, length=300, dtype=torch.float32):
    return XQuantCache(llama_config(layers), xq, max_batch_size=batch, max_cache_len=length, device="cpu", dtype=dtype)


def stream(n, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g).to(dtype), torch.randn(batch, H, n, D, generator=g).to(dtype)


def storage(cache):
    return {(i, k): t.clone() for i, layer in enumerate(cache.layers) for k, t in layer.storage.items()}


@pytest.mark.parametrize(
    "preset,prompt", [("kivi-2", 1), ("kivi-2", 129), ("asymkv-1.5", 33), ("xquant-1.38", 31), ("xquant-1.38", 200), ("kivi-4", 161),
                      ("xquant-1.38:sink_tokens=4", 3), ("xquant-1.38:sink_tokens=4", 4), ("xquant-1.38:sink_tokens=4", 200),
                      ("kivi-2:rotation=hadamard,level_fit=lsq,sink_tokens=7", 33),
                      ("kivi-2:value_group_size=64,rotation=hadamard,sink_tokens=4", 161),
                      ("xquant-1.38:v_share_from=0,k_share_from=0,level_fit=lsq,eta=none", 161)]
)
def test_prefill_then_decode_equals_token_by_token(preset, prompt):
    """Prefill of a prompt + decode leaves the same storage as feeding every token alone."""
    total = 230
    k, v = stream(total)
    a, b = make_cache(preset, layers=2), make_cache(preset, layers=2)
    for layer in range(2):
        a.update(k[:, :, :prompt], v[:, :, :prompt], layer)
    for t in range(prompt, total):
        for layer in range(2):
            a.update(k[:, :, t : t + 1], v[:, :, t : t + 1], layer)
    for t in range(total):
        for layer in range(2):
            b.update(k[:, :, t : t + 1], v[:, :, t : t + 1], layer)
    sa, sb = storage(a), storage(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("n", [1, 31, 128, 129, 161, 250, 300])
def test_read_is_window_then_codes(n):
    """Newest tokens read back exactly; older ones within half a quantization step."""
    cache = make_cache("kivi-2", layers=1)
    k, v = stream(n)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    keys, values = layer.read(2, n)
    nk, nv = quant.key_boundary(n, 128, 32), quant.value_boundary(n, 128)
    assert torch.equal(keys[:, :, nk:n], k[:, :, nk:])
    assert torch.equal(values[:, :, nv:n], v[:, :, nv:])
    assert n - nk <= 128 and (n <= 128 or n - nk > 128 - 32)
    if nk:
        step = layer.k_scale[:2, :, : nk // 32].repeat_interleave(32, 2)
        assert torch.all((keys[:, :, :nk] - k[:, :, :nk]).abs() <= step / 2 + 1e-5)
        assert not torch.equal(keys[:, :, :nk], k[:, :, :nk])
    if nv:
        step = layer.v_scale[:2, :, :nv].repeat_interleave(32, -1)
        assert torch.all((values[:, :, :nv] - v[:, :, :nv]).abs() <= step / 2 + 1e-5)
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()


def test_prefill_returns_full_precision_prompt():
    cache = make_cache("asymkv-1.5", layers=1)
    k, v = stream(250)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(keys[:, :, :250], k) and torch.equal(values[:, :, :250], v)
    stored_k, stored_v = cache.layers[0].read(2, 250)
    k2, v2 = stream(10, seed=1)
    keys, values = cache.update(k2, v2, 0)  # a continuation attends over the past as stored
    assert torch.equal(keys[:, :, :250], stored_k[:, :, :250]) and torch.equal(keys[:, :, 250:260], k2)
    assert torch.equal(values[:, :, :250], stored_v[:, :, :250])


def test_sharing_layer_stores_no_codes_and_reads_partner_codes():
    xq = XQuantConfig(k_bits=2, v_bits=1, k_share_from=0, v_share_from=0, eta={1: 1 / 6, 2: 0.045})
    cache = make_cache(xq, layers=2)
    even, odd = cache.layers
    assert "k_codes" in even.storage and "v_codes" in even.storage
    assert "k_codes" not in odd.storage and "v_codes" not in odd.storage
    k0, v0 = stream(200, seed=1)
    k1, v1 = stream(200, seed=2)
    cache.update(k0, v0, 0)
    cache.update(k1, v1, 1)
    # odd layer: its own scale/zero (own min/max, own calibration), the even layer's codes
    nk = quant.key_boundary(200, 128, 32)
    assert nk == 96
    _, s1, z1 = quant.quantize_keys(k1[:, :, :nk], 2, 32, 0.045)
    c0, _, _ = quant.quantize_keys(k0[:, :, :nk], 2, 32, 0.045)
    assert torch.equal(odd.k_scale[:2, :, :3], s1) and torch.equal(odd.k_zero[:2, :, :3], z1)
    keys, values = odd.read(2, 200)
    assert torch.allclose(keys[:, :, :nk], quant.dequantize_keys(c0, s1, z1, 32))
    cv0, _, _ = quant.quantize_values(v0[:, :, :72], 1, 32, 1 / 6)
    _, sv1, zv1 = quant.quantize_values(v1[:, :, :72], 1, 32, 1 / 6)
    assert torch.allclose(values[:, :, :72], quant.dequantize_values(cv0, sv1, zv1, 32))
    assert torch.equal(keys[:, :, nk:200], k1[:, :, nk:]) and torch.equal(values[:, :, 72:200], v1[:, :, 72:])


def test_resolve_sharing_rules():
    plans = XQuantConfig.preset("xquant-1.38").resolve(30)
    assert [p.index for p in plans if p.v_shares] == list(range(15, 30, 2))
    assert not any(p.k_shares for p in plans)
    xq = XQuantConfig(k_bits=[2, 4, 2, 2], v_bits=2, k_share_from=0)
    assert [p.k_shares for p in xq.resolve(4)] == [False, False, False, True]  # 1 differs in bits
    assert [p.k_shares for p in xq.resolve(4, sliding=[False, False, True, False])] == [False] * 4


@pytest.mark.parametrize("layers,expected", [(32, 1.375), (30, 82 / 60)])
def test_xquant_138_code_bits(layers, expected):
    cache = XQuantCache(llama_config(layers), "xquant-1.38", max_cache_len=4096)
    assert cache.memory_report()["code_bits"] == pytest.approx(expected, abs=1e-12)
    assert XQuantConfig.preset("xquant-1.38").code_bits(layers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("preset", XQuantConfig.PRESETS)
def test_memory_report_exact_to_the_byte(preset):
    B, T, L = 3, 1000, 4
    planned = XQuantCache(llama_config(L), preset, max_batch_size=B, max_cache_len=T).memory_report(torch.float16)
    cache = make_cache(preset, layers=L, batch=B, length=T, dtype=torch.float16)
    report = cache.memory_report()
    assert report == planned
    assert report["bytes"] == cache.allocated_bytes()
    elements = L * 2 * B * H * T * D
    assert report["elements"] == elements and report["bf16_bytes"] == 2 * elements
    # by hand, for the plain 2-bit layout: Tq = ceil((T - R) / G) * G = 896
    if preset == "kivi-2":
        tq = 896
        per_layer = (
            B * H * tq * 2 // 32 * D * 4      # key codes
            + 2 * B * H * tq // 32 * D * 2    # key scale + zero
            + B * H * tq * D * 2 // 32 * 4    # value codes
            + 2 * B * H * tq * D // 32 * 2    # value scale + zero
            + 2 * B * H * 128 * D * 2         # two windows
        )
        assert report["bytes"] == L * per_layer
        assert report["stored_bits"] == pytest.approx(8 * L * per_layer / elements)
    if preset == "fp16":
        assert report["bytes"] == report["bf16_bytes"] and report["code_bits"] == 16


def test_long_cache_stored_bits_approach_code_bits_plus_metadata():
    cache = XQuantCache(llama_config(32), "kivi-2", max_cache_len=131072)
    report = cache.memory_report()
    # 2-bit codes + 2 x 16-bit scale/zero per 32 elements (keys and values) + a 128-token window
    assert report["stored_bits"] == pytest.approx(2 + 1 + 128 / 131072 * 16, abs=0.01)


# --------------------------------------------------------------------------- errors, nothing lost
def test_overflow_is_refused_and_loses_nothing():
    cache = make_cache("kivi-2", layers=1, length=200)
    k, v = stream(199)
    cache.update(k, v, 0)
    before = storage(cache)
    with pytest.raises(ValueError, match="max_cache_len=200"):
        cache.update(*stream(2), 0)
    assert all(torch.equal(before[key], t) for key, t in storage(cache).items())
    assert int(cache.get_seq_length()) == 199
    cache.update(*stream(1), 0)
    with pytest.raises(ValueError, match="max_cache_len=200"):
        cache.update(*stream(1), 0)
    assert int(cache.get_seq_length()) == 200


def test_batch_dtype_and_shape_errors():
    cache = make_cache("kivi-2", layers=1, batch=2)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        cache.update(*stream(4, batch=3), 0)
    with pytest.raises(ValueError, match="torch.float16.*torch.float32"):
        cache.update(*stream(4, dtype=torch.float16), 0)
    assert int(cache.get_seq_length()) == 0
    cache.update(*stream(4, batch=1), 0)  # a smaller batch uses a slice
    assert int(cache.get_seq_length()) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_bits=3), "k_bits"),
        (dict(v_bits=[2, 8]), "v_bits"),
        (dict(group_size=48), "group_size"),
        (dict(residual_length=100), "residual_length"),
        (dict(residual_length=0), "residual_length"),
        (dict(k_share_from=-1), "k_share_from"),
        (dict(v_share_from=1.5), "v_share_from"),
        (dict(eta={2: 0.6}), r"eta\[2\]"),
        (dict(eta={3: 0.1}), "eta"),
        (dict(k_bits=[2, 2], v_bits=[1, 1, 1]), "per-layer"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(sink_tokens=128), r"sink_tokens=128: must be an int in \[0, residual_length=128\)"),
        (dict(sink_tokens=2.0), "sink_tokens"),
        (dict(rotation="random"), "rotation='random'"),
        (dict(level_fit="kmeans"), "level_fit='kmeans'"),
        (dict(level_fit="lsq", eta={1: 0.25}), "eta calibration does not apply"),
    ],
)
def test_invalid_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XQuantConfig(**kwargs)


def test_per_layer_bits_must_match_model_and_head_dim_must_fit_group():
    with pytest.raises(ValueError, match="lists 2 layers but the model has 4"):
        XQuantCache(llama_config(4), XQuantConfig(k_bits=[2, 2], v_bits=[2, 2]), max_cache_len=64)
    with pytest.raises(ValueError, match="head_dim 64 is not a multiple of group_size 128"):
        make_cache(XQuantConfig(group_size=128))
    with pytest.raises(ValueError, match="unknown preset"):
        XQuantConfig.preset("kivi-3")
    with pytest.raises(ValueError, match="max_cache_len"):
        XQuantCache(llama_config(4), "kivi-2")


def test_reset_and_reorder():
    cache = make_cache("kivi-2", layers=1)
    k, v = stream(200)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    keys, _ = layer.read(2, 200)
    cache.reorder_cache(torch.tensor([1, 0]))
    swapped, _ = layer.read(2, 200)
    assert torch.equal(swapped[0], keys[1]) and torch.equal(swapped[1], keys[0])
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    assert all(t.count_nonzero() == 0 for t in layer.storage.values())
    assert math.isclose(cache.memory_report()["code_bits"], 2.0)


# ------------------------------------------------------------------ quality options
@pytest.mark.parametrize("spec", ["kivi-2:sink_tokens=4", "xquant-1.38:sink_tokens=5,level_fit=lsq,eta=none"])
@pytest.mark.parametrize("prompt", [1, 200])
def test_sink_tokens_never_quantized_and_read_back_exactly(spec, prompt):
    """Sinks read back bit for bit long after their group left the window, and huge sink keys do not
    stretch the range of the key group they sit in (it is quantized as if position S stood there)."""
    n = 250
    k, v = stream(n)
    k[:, :, :4] *= 1000  # attention-sink-like outliers
    cache = make_cache(spec, layers=2)
    S = cache.xquant_config.sink_tokens
    for layer in range(2):
        cache.update(k[:, :, :prompt], v[:, :, :prompt], layer)
    for t in range(prompt, n):
        for layer in range(2):
            cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], layer)
    for layer in cache.layers:
        keys, values = layer.read(2, n)
        assert quant.key_boundary(n, 128, 32) > S and quant.value_boundary(n, 128) > S  # sinks left the window
        assert torch.equal(keys[:, :, :S], k[:, :, :S]) and torch.equal(values[:, :, :S], v[:, :, :S])
        # group 0's scale comes from positions S..31 only: the *1000 sinks would make it ~1000x larger
        assert layer.k_scale[:2, :, 0].abs().max() < 5 * k[:, :, S:32].abs().max()
        assert (keys[:, :, S:32] - k[:, :, S:32]).abs().mean() < 0.5  # a range stretched by the sinks: ~100


def test_sink_tokens_are_counted_in_stored_bits():
    B, T, L, S = 2, 1000, 4, 4
    plain = make_cache("xquant-1.38", layers=L, batch=B, length=T, dtype=torch.float16)
    sinks = make_cache("xquant-1.38:sink_tokens=4", layers=L, batch=B, length=T, dtype=torch.float16)
    extra = L * 2 * B * H * S * D * 2  # keys + values of every quantized layer, fp16
    assert sinks.memory_report()["bytes"] - plain.memory_report()["bytes"] == extra
    assert sinks.memory_report()["bytes"] == sinks.allocated_bytes()
    assert sinks.memory_report()["code_bits"] == plain.memory_report()["code_bits"]
    # a full-precision tensor needs no sink buffer
    assert make_cache(XQuantConfig(k_bits=2, v_bits=16, sink_tokens=4), layers=1).layers[0].storage.keys() >= {"k_sink"}
    assert "v_sink" not in make_cache(XQuantConfig(k_bits=2, v_bits=16, sink_tokens=4), layers=1).layers[0].storage


@pytest.mark.parametrize("n", [100, 161, 300])
def test_rotated_read_equals_its_naive_reference(n):
    """keys/values read back = H * dequantize(quantize(H * x)) below the boundaries (H the Hadamard
    matrix, its own inverse), the exact inputs in the window; the stored window is rotated."""
    cache = make_cache("kivi-2:rotation=hadamard,level_fit=lsq", layers=1)
    k, v = stream(n)
    cache.update(k, v, 0)
    keys, values = cache.layers[0].read(2, n)
    h = quant.hadamard_matrix(D)
    nk, nv = quant.key_boundary(n, 128, 32), quant.value_boundary(n, 128)
    want_k = quant.dequantize_keys(*quant.quantize_keys(k[:, :, :nk] @ h, 2, 32, fit="lsq"), 32) @ h
    want_v = quant.dequantize_values(*quant.quantize_values(v[:, :, :nv] @ h, 2, 32, fit="lsq"), 32) @ h
    assert torch.allclose(keys[:, :, :nk], want_k, atol=1e-5)
    assert torch.allclose(values[:, :, :nv], want_v, atol=1e-5)
    assert torch.allclose(keys[:, :, nk:n], k[:, :, nk:], atol=1e-5)
    assert torch.allclose(values[:, :, nv:n], v[:, :, nv:], atol=1e-5)
    slot = (n - 1) % 128
    assert torch.allclose(cache.layers[0].k_window[:2, :, slot], k[:, :, n - 1] @ h, atol=1e-6)


def test_value_groups_store_fewer_scales():
    """``value_group_size=64`` on head_dim 64: one value scale and zero point per token instead of
    two, the keys' untouched; the report's metadata bits drop by exactly half the values' share,
    and values still read back within their groups' quantization error."""
    plain, wide = make_cache("kivi-2", layers=1), make_cache("kivi-2:value_group_size=64", layers=1)
    assert wide.xquant_config.value_group == 64 and plain.xquant_config.value_group == 32
    k, v = stream(200)
    for cache in (plain, wide):
        cache.update(k, v, 0)
    assert wide.layers[0].v_scale.shape[-1] == 1 and plain.layers[0].v_scale.shape[-1] == 2
    assert wide.layers[0].k_scale.shape == plain.layers[0].k_scale.shape
    p, w = plain.memory_report(), wide.memory_report()
    assert p["code_bits"] == w["code_bits"]
    assert math.isclose(p["metadata_bits"] - w["metadata_bits"], p["metadata_bits"] / 4)
    assert math.isclose(p["stored_bits"] - w["stored_bits"], p["metadata_bits"] / 4)
    nv = quant.value_boundary(200, 128)
    values = wide.layers[0].read_stored("v", 2, 200)
    span = v[:, :, :nv].amax(-1, keepdim=True) - v[:, :, :nv].amin(-1, keepdim=True)  # one group: the whole head
    assert ((values[:, :, :nv] - v[:, :, :nv]).abs() <= span / 6 + 1e-5).all()
    assert not torch.equal(values[:, :, :nv], plain.layers[0].read_stored("v", 2, 200)[:, :, :nv])


def test_value_group_size_is_checked():
    with pytest.raises(ValueError, match="value_group_size=48: must be None or one of"):
        XQuantConfig.from_spec("kivi-2:value_group_size=48")
    assert XQuantConfig.from_spec("kivi-2:value_group_size=none").value_group == 32
    with pytest.raises(ValueError, match="value head_dim 64 is not a multiple of value_group_size 128"):
        make_cache("kivi-2:value_group_size=128", layers=1).memory_report()
    # the ops read the value group from the storage, and refuse scales that do not split the head
    assert quant.value_group(torch.zeros(2, 64), torch.zeros(2, 1)) == 64
    with pytest.raises(ValueError, match=r"value scales \(2, 3\) do not divide head_dim 64 into groups"):
        quant.value_group(torch.zeros(2, 64), torch.zeros(2, 3))


def test_rotation_needs_a_power_of_two_head_dim():
    cfg = LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=96)
    with pytest.raises(ValueError, match="power-of-two head dim; the key head_dim is 96"):
        XQuantCache(cfg, "kivi-2:rotation=hadamard", max_cache_len=256).memory_report()
    XQuantCache(cfg, "kivi-2", max_cache_len=256).memory_report()  # 96 is fine unrotated


def test_quality_options_parse_from_a_spec():
    xq = XQuantConfig.from_spec("xquant-1.38:sink_tokens=4,rotation=hadamard,level_fit=lsq,eta=none")
    assert (xq.sink_tokens, xq.rotation, xq.level_fit, xq.eta) == (4, "hadamard", "lsq", {})
    with pytest.raises(ValueError, match="eta calibration does not apply"):
        XQuantConfig.from_spec("xquant-1.38:level_fit=lsq")
    with pytest.raises(ValueError, match="sink_tokens='x' is not an int"):
        XQuantConfig.from_spec("kivi-2:sink_tokens=x")
