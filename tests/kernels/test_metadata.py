"""Scales and zero points stored in float8 (``XQuantConfig.metadata_dtype="float8_e4m3fn"``):
config and spec parsing, the reference cache, the Triton kernels (under the interpreter) against
the reference, memory accounting, and merging eval tables (``eval --append``)."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # as in test_kernels.py, for a run of this file alone

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from test_kernels import (  # noqa: E402,F401  (kernels: the fixture)
    ORDER,
    assert_close_rel,
    kernels,
    left_padding_mask,
    make_storage,
    poison_workspace,
    reference_attend,
    run_attend,
    storage_args,
)
from xquant_fx import XQuantCache, XQuantConfig, evaluate, quant  # noqa: E402
from xquant_fx.config import FP8_E4M3_MAX, MoESchedule  # noqa: E402
from xquant_fx.kernels import common as _common  # noqa: E402

F8 = torch.float8_e4m3fn
FP8 = "float8_e4m3fn"
META = ("k_scale", "k_zero", "v_scale", "v_zero")


def as_bytes(t):
    """Comparable form of a storage tensor (torch.equal has no float8 kernel on CPU)."""
    return t.view(torch.uint8) if t.dtype == F8 else t


def assert_same_storage(got, ref, where=""):
    for name in ORDER:
        if got[name] is None:
            continue
        assert got[name].dtype == ref[name].dtype, name
        assert torch.equal(as_bytes(got[name]), as_bytes(ref[name])), f"{name} differs {where}"


def fp8_metadata(st):
    """A storage dict with its scales / zero points stored in float8 (clamped, rounded)."""
    return {name: quant.to_metadata(t.float(), F8) if name in META else t for name, t in st.items()}


# --------------------------------------------------------------------------- config and specs
def test_metadata_dtype_field():
    assert XQuantConfig().metadata_dtype is None
    assert XQuantConfig.preset("kivi-2").metadata_dtype is None
    assert XQuantConfig(metadata_dtype=FP8).metadata_dtype == FP8
    assert XQuantConfig(metadata_dtype=torch.float8_e4m3fn).metadata_dtype == FP8  # the torch dtype, by name
    for bad in ("float16", "fp8", "float8_e5m2", torch.bfloat16, 8, ""):
        with pytest.raises(ValueError, match=r"XQuantConfig\.metadata_dtype=.*None.*float8_e4m3fn"):
            XQuantConfig(metadata_dtype=bad)


@pytest.mark.parametrize("spec, expect", [
    ("kivi-2", dict(name="kivi-2", metadata_dtype=None, group_size=32)),
    ("kivi-2:metadata_dtype=float8_e4m3fn", dict(k_bits=2, v_bits=2, metadata_dtype=FP8)),
    (" xquant-1.38:group_size=64, metadata_dtype=float8_e4m3fn ",
     dict(name="xquant-1.38:group_size=64, metadata_dtype=float8_e4m3fn", group_size=64, metadata_dtype=FP8,
          v_share_from=0.5, k_bits=2, v_bits=1)),
    ("kivi-4:k_bits=2/2/4/4,v_share_from=none", dict(k_bits=(2, 2, 4, 4), v_share_from=None)),
    ("kivi-2:k_share_from=3,v_share_from=0.5,residual_length=256", dict(k_share_from=3, v_share_from=0.5,
                                                                        residual_length=256)),
    ("xquant-1.38:eta=1:0.2/2:0.1", dict(eta={1: 0.2, 2: 0.1})),
    ("xquant-1.38:eta=none,metadata_dtype=none", dict(eta={}, metadata_dtype=None)),
    ("kivi-2:moe_top_k=4/4/2,moe_renormalize=true,moe_top_p=0.9", dict(moe_top_k=(4, 4, 2), moe_renormalize=True,
                                                                       moe_top_p=0.9)),
])
def test_from_spec(spec, expect):
    xq = XQuantConfig.from_spec(spec)
    assert xq.name == (expect.pop("name", None) or spec.strip())
    for name, value in expect.items():
        assert getattr(xq, name) == value, name


@pytest.mark.parametrize("spec, match", [
    ("kivi-3", r"unknown preset 'kivi-3'; choose one of fp16, kivi-2"),
    ("kivi-2:metadata=fp8", r"unknown field 'metadata'; fields: k_bits, .*metadata_dtype"),
    ("kivi-2:name=short", r"unknown field 'name' \(a spec's name is the spec itself\)"),
    ("kivi-2:group_size=48", r"'kivi-2:group_size=48': XQuantConfig.group_size=48: must be one of"),
    ("kivi-2:group_size=big", r"group_size='big' is not an int"),
    ("kivi-2:metadata_dtype=float16", r"XQuantConfig.metadata_dtype='float16'"),
    ("kivi-2:k_bits=3", r"XQuantConfig.k_bits=3"),
    ("kivi-2:eta=0.1", r"eta='0.1' is not none or bits:eta pairs"),
    ("kivi-2:moe_renormalize=maybe", r"moe_renormalize='maybe' is not true or false"),
    ("kivi-2:", r"'' is not field=value"),
    ("kivi-2:group_size", r"'group_size' is not field=value"),
    ("kivi-2:group_size=64,group_size=32", r"field 'group_size' is given twice"),
    ("", r"expected PRESET or PRESET:field=value"),
])
def test_from_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        XQuantConfig.from_spec(spec)


def test_config_serialization_round_trip():
    from xquant_fx.aoti import config_from_dict, config_to_dict

    for xq in (XQuantConfig.from_spec("xquant-1.38:group_size=64,metadata_dtype=float8_e4m3fn"),
               XQuantConfig(k_bits=[2, 4], v_bits=[1, 2], metadata_dtype=torch.float8_e4m3fn),
               XQuantConfig.preset("kivi-2")):
        d = json.loads(json.dumps(config_to_dict(xq)))
        assert d["metadata_dtype"] == xq.metadata_dtype
        assert config_from_dict(d) == xq
    for top_k in (MoESchedule(2, 8, 4, 1), (4, 2, 2), 3):  # a schedule stays a schedule
        xq = XQuantConfig(moe_top_k=top_k)
        back = config_from_dict(json.loads(json.dumps(config_to_dict(xq))))
        assert back == xq and type(back.moe_top_k) is type(xq.moe_top_k)
    old = config_to_dict(XQuantConfig.preset("kivi-2"))
    del old["metadata_dtype"]  # a package written before the field existed
    assert config_from_dict(old).metadata_dtype is None


# --------------------------------------------------------------------------- reference path
def test_to_metadata_clamps_float8_and_leaves_other_dtypes_alone():
    x = torch.tensor([1e6, -1e6, 449.0, -500.0, 0.3, 1e-4, float("inf"), -float("inf")])
    got = quant.to_metadata(x, F8)
    assert got.dtype == F8
    assert got.float().tolist()[:4] == [448.0, -448.0, 448.0, -448.0]
    assert not got.float().isnan().any()
    assert got.float()[4] == torch.tensor(0.3).to(F8).float()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(quant.to_metadata(x, dtype), x.to(dtype))


def llama_config(**kw):
    from mini_models import mini_config

    return mini_config("llama", num_hidden_layers=2, **kw)


def fill_cache(cache, keys, values, prefill):
    """Prefill ``prefill`` tokens, then decode the rest one at a time, in every layer."""
    layers = len(cache.layers)
    for i in range(layers):
        cache.update(keys[i][:, :, :prefill], values[i][:, :, :prefill], i)
    for t in range(prefill, keys[0].shape[2]):
        for i in range(layers):
            cache.update(keys[i][:, :, t : t + 1], values[i][:, :, t : t + 1], i)


def random_kv(layers, n, dtype, seed=0, outlier=300.0, small=0.01):
    """Keys / values ``[1, 2, n, 64]`` per layer. With the defaults some zero points pass float8's
    +-448 and are clamped (key channel 5, the first value group of every third token, offset by
    ``outlier``) and some scales are float8 subnormals (the last value group, scaled by ``small``)."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(layers):
        k = torch.randn(1, 2, n, 64, generator=gen)
        v = torch.randn(1, 2, n, 64, generator=gen)
        k[..., 5] -= 2 * outlier
        v[..., 32:] *= small
        v[:, :, ::3, :32] -= outlier * 1.6
        keys.append(k.to(dtype))
        values.append(v.to(dtype))
    return keys, values


@pytest.mark.parametrize("spec", ["kivi-2", "xquant-1.38"])
def test_cache_stores_float8_metadata_of_the_reference_quantizer(spec):
    """Scales / zero points are float8 tensors holding the reference quantizer's, clamped and cast
    (keys below Nk(n), values below Nv(n), prefilled and decoded alike; the sharing layer its
    own); codes and windows as with model-dtype metadata."""
    xq = XQuantConfig.from_spec(f"{spec}:metadata_dtype=float8_e4m3fn,residual_length=32")
    dtype, n, prefill, G, R = torch.bfloat16, 150, 40, 32, 32
    keys, values = random_kv(2, n, dtype)
    cache = XQuantCache(llama_config(), xq, max_cache_len=160)
    plain = XQuantCache(llama_config(), xq.replace(metadata_dtype=None), max_cache_len=160)
    fill_cache(cache, keys, values, prefill)
    fill_cache(plain, keys, values, prefill)
    nk, nv = quant.key_boundary(n, R, G), quant.value_boundary(n, R)
    for i, layer in enumerate(cache.layers):
        assert {layer.storage[name].dtype for name in META} == {F8}
        assert layer.k_window.dtype == dtype
        for name in layer.storage:
            if name not in META:
                assert torch.equal(layer.storage[name], plain.layers[i].storage[name]), name
        eta_k, eta_v = xq.eta_for(layer.plan.k_bits), xq.eta_for(layer.plan.v_bits)
        _, ks, kz = quant.quantize_keys(keys[i][:, :, :nk], layer.plan.k_bits, G, eta_k)
        _, vs, vz = quant.quantize_values(values[i][:, :, :nv], layer.plan.v_bits, G, eta_v)
        for name, want, got in (("k_scale", ks, layer.k_scale[:, :, : nk // G]),
                                ("k_zero", kz, layer.k_zero[:, :, : nk // G]),
                                ("v_scale", vs, layer.v_scale[:, :, :nv]), ("v_zero", vz, layer.v_zero[:, :, :nv])):
            assert torch.equal(as_bytes(got), as_bytes(quant.to_metadata(want, F8))), f"layer {i} {name}"
            assert not got.float().isnan().any()
        assert (layer.k_zero.float() == -FP8_E4M3_MAX).any() and (layer.v_zero.float() == -FP8_E4M3_MAX).any()


def test_float8_metadata_attention_close_to_model_dtype_metadata():
    """Attention over a cache with float8 metadata: close to the cache with bfloat16 metadata,
    and about as far from full-precision attention (inputs of normal magnitude: nothing clamped,
    no subnormal scales)."""
    dtype, n, prefill = torch.bfloat16, 150, 40
    keys, values = random_kv(2, n, dtype, seed=1, outlier=0.0, small=1.0)
    q = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    exact = quant.attend(q, keys[1], values[1], torch.tensor(n), 0.125).float()
    outs = {}
    for md in (None, FP8):
        xq = XQuantConfig.from_spec("kivi-2:residual_length=32").replace(metadata_dtype=md)
        cache = XQuantCache(llama_config(), xq, max_cache_len=160)
        fill_cache(cache, keys, values, prefill)
        k, v = cache.layers[1].read(1, n)
        outs[md] = quant.attend(q, k, v, torch.tensor(n), 0.125).float()
    quant_err = (outs[None] - exact).norm() / exact.norm()
    fp8_err = (outs[FP8] - exact).norm() / exact.norm()
    between = (outs[FP8] - outs[None]).norm() / exact.norm()
    assert 0 < between < quant_err and fp8_err < 1.5 * quant_err, (between, quant_err, fp8_err)


# --------------------------------------------------------------------------- kernels
FP8_APPEND_CASES = [
    # dtype, kb, vb, G, R, dk, dv, share_k, share_v, k_eta, v_eta
    pytest.param(torch.bfloat16, 2, 1, 32, 64, 64, 64, False, False, 0.045, 1 / 6, id="bf16-k2v1-eta"),
    pytest.param(torch.float16, 2, 2, 32, 32, 64, 64, False, True, 0.0, 0.0, id="fp16-k2v2-vshare"),
    pytest.param(torch.float32, 4, 4, 64, 64, 64, 128, True, False, 0.0, 0.0, id="fp32-k4v4-g64-kshare"),
]


@pytest.mark.parametrize("dtype,kb,vb,G,R,dk,dv,share_k,share_v,k_eta,v_eta", FP8_APPEND_CASES)
def test_append_kernel_float8_metadata_matches_reference(kernels, dtype, kb, vb, G, R, dk, dv, share_k, share_v,
                                                         k_eta, v_eta):
    """The flush kernel stores float8 scales / zero points bit-equal to the reference's (clamped,
    rounded to nearest even, subnormals too), over steps before, at and past ``pos == R``."""
    B, b, H = 2, 2, 2
    ref = fp8_metadata(make_storage(B, H, dk, dv, kb, vb, G, R, R + 2 * G, dtype, seed=1))
    got = {name: t.clone() for name, t in ref.items()}
    gen = torch.Generator().manual_seed(2)
    for pos in [0, R - 1, R, R + 1, R + G]:
        k = torch.randn(b, H, 1, dk, generator=gen) * 2
        v = torch.randn(b, H, 1, dv, generator=gen) * 2
        k[..., :4] -= 600.0  # zero points past -448: clamped
        v[..., : dv // 2] *= 0.002  # tiny ranges: subnormal scales
        k, v = k.to(dtype), v.to(dtype)
        p = torch.tensor(pos)
        quant.append_token(k, v, p, *storage_args(ref, share_k, share_v), kb, vb, G, k_eta, v_eta)
        kernels.append.append_token(k, v, p, *storage_args(got, share_k, share_v), kb, vb, G, k_eta, v_eta)
        assert_same_storage(got, ref, f"after the step at pos={pos}")
    assert (ref["k_zero"].float() == -FP8_E4M3_MAX).any()
    assert ((ref["v_scale"].float() > 0) & (ref["v_scale"].float() < 2.0**-6)).any()  # a subnormal was stored


@triton.jit
def _convert_kernel(x_ptr, y_ptr, N: tl.constexpr):
    """``y = to_metadata(x, y.dtype)``, elementwise."""
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _common.to_metadata(tl.load(x_ptr + i), y_ptr.dtype.element_ty))


def test_kernel_float8_rounding_matches_torch(kernels):
    """The kernels' float32 -> float8 e4m3 conversion (integer rounding: the interpreter's own
    conversion rounds wrongly) equals ``x.clamp(-448, 448).to(torch.float8_e4m3fn)`` for every
    float8 value, every midpoint between two and its neighbours, subnormals, out-of-range values,
    signed zeros and NaN."""
    exact = torch.arange(256, dtype=torch.uint8).view(F8).float()
    exact = exact[exact.isfinite()].sort().values
    mids = (exact[1:] + exact[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    special = torch.tensor([448.5, 463.9, 464.0, 465.0, 1e9, float("inf"), -float("inf"), float("nan"), 0.0, -0.0,
                            1e-40, -1e-40, 2.0**-10, 3 * 2.0**-11, 2.0**-6 - 2.0**-11, 31.0, 1.0625])
    x = torch.cat([exact, mids, mids.nextafter(up), mids.nextafter(down), special,
                   torch.randn(200, generator=torch.Generator().manual_seed(0)) * 50])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    y = torch.zeros(n, dtype=F8)
    _convert_kernel[(1,)](x, y, n)
    assert torch.equal(y.view(torch.uint8), quant.to_metadata(x, F8).view(torch.uint8))


FP8_ATTEND_CASES = [
    # n, Lq, gqa, kb, vb, G, dtype, variant, masked
    pytest.param(300, 1, 4, 2, 1, 32, torch.bfloat16, "warps-t", False, id="bf16-warps-t"),
    pytest.param(300, 2, 2, 2, 2, 32, torch.float16, "warps-t", True, id="fp16-warps-t-lq2-mask"),
    pytest.param(290, 1, 4, 2, 1, 16, torch.float16, "packed", False, id="fp16-packed-g16-split-value-words"),
    pytest.param(330, 1, 3, 1, 2, 64, torch.bfloat16, "packed", True, id="bf16-packed-k1v2-g64-mask"),
    pytest.param(300, 1, 4, 4, 4, 32, torch.bfloat16, "generic", False, id="bf16-generic-k4v4"),
    pytest.param(200, 3, 2, 2, 1, 32, torch.float32, None, True, id="fp32-default-lq3-mask"),
]


@pytest.mark.parametrize("n,lq,gqa,kb,vb,G,dtype,variant,masked", FP8_ATTEND_CASES)
def test_attend_kernel_float8_metadata_matches_reference(kernels, monkeypatch, n, lq, gqa, kb, vb, G, dtype, variant,
                                                         masked):
    """Each kernel variant loads float8 scales / zero points (converted to float32 for the generic
    tiles, to the cache dtype for the packed decoders) and matches the reference with the
    tolerances of test_kernels.py."""
    B, hkv, dk, dv, R, T = 2, 2, 64, 64, 64, 384
    st = fp8_metadata(make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n))
    q = torch.randn(B, hkv * gqa, lq, dk, generator=torch.Generator().manual_seed(3)).to(dtype)
    mask = left_padding_mask(B, lq, n + 5, [0, 70]) if masked else None
    ref = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125, mask)
    poison_workspace(kernels, monkeypatch)
    launch = dict(splits=2) if variant is None else dict(splits=2, variant=variant)
    got = run_attend(kernels, q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125, mask, **launch)
    assert_close_rel(got, ref, 1e-4 if dtype == torch.float32 else 2e-2)


def test_ops_run_the_kernels_with_float8_metadata(kernels, monkeypatch):
    """``xquant::append_token`` / ``xquant::attend`` on the kernel path with float8 metadata."""
    monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
    B, H, d, kb, vb, G, R, T = 1, 2, 64, 2, 1, 32, 32, 160
    dtype = torch.bfloat16
    ref = fp8_metadata(make_storage(B, H, d, d, kb, vb, G, R, T, dtype, seed=11))
    got = {name: t.clone() for name, t in ref.items()}
    pos = torch.tensor(R + G)
    k, v = torch.randn(B, H, 1, d).to(dtype), torch.randn(B, H, 1, d).to(dtype)
    quant.append_token(k, v, pos, *storage_args(ref), kb, vb, G, 0.045, 1 / 6)
    torch.ops.xquant.append_token(k, v, pos, *storage_args(got), kb, vb, G, 0.045, 1 / 6)
    assert_same_storage(got, ref)
    n = R + G + 1
    q = torch.randn(B, 2 * H, 1, d).to(dtype)
    out = torch.ops.xquant.attend(q, *storage_args(got), torch.tensor(n), kb, vb, G, 0.125)
    assert_close_rel(out, reference_attend(q, got, got["k_codes"], got["v_codes"], n, kb, vb, G, 0.125), 2e-2)


def test_kernels_refuse_mixed_metadata_dtypes(kernels):
    st = make_storage(1, 1, 64, 64, 2, 2, 32, 64, 128, torch.bfloat16)
    st["k_scale"] = st["k_scale"].to(F8)  # zero point left in bfloat16
    q = torch.randn(1, 1, 1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="key scale / zero point are torch.float8_e4m3fn / torch.bfloat16"):
        kernels.attend.attend(q, *storage_args(st), torch.tensor(70), 2, 2, 32, 0.125)
    k = torch.randn(1, 1, 1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="key scale / zero point"):
        kernels.append.append_token(k, k, torch.tensor(70), *storage_args(st), 2, 2, 32, 0.0, 0.0)


# --------------------------------------------------------------------------- memory accounting
def test_memory_report_counts_float8_metadata_at_8_bits():
    """kivi-2 at G=32, bf16: scale + zero point cost 2 x 16 / 32 = 1 bit per quantized value,
    0.5 with float8; code bits unchanged, stored bits down by exactly the difference."""
    from xquant_fx.memory import load_config

    config = load_config("llama-3.1-8b")
    T = 8192 + 128
    Tq = T - 128  # positions ever quantized (a multiple of G here)
    reports = {md: XQuantCache(config, XQuantConfig.preset("kivi-2").replace(metadata_dtype=md),
                               max_cache_len=T).memory_report(torch.bfloat16) for md in (None, FP8)}
    bf16, fp8 = reports[None], reports[FP8]
    assert bf16["metadata_bits"] == pytest.approx(1.0 * Tq / T)
    assert fp8["metadata_bits"] == pytest.approx(0.5 * Tq / T)
    assert fp8["code_bits"] == bf16["code_bits"] == 2.0
    assert bf16["stored_bits"] - fp8["stored_bits"] == pytest.approx(0.5 * Tq / T)
    # group 64: the same 0.5 bit with bf16 metadata
    g64 = XQuantCache(config, XQuantConfig.from_spec("kivi-2:group_size=64"), max_cache_len=T).memory_report(
        torch.bfloat16)
    assert g64["metadata_bits"] == pytest.approx(fp8["metadata_bits"])


def test_allocated_bytes_match_the_report_with_float8_metadata():
    cache = XQuantCache(llama_config(), "xquant-1.38:metadata_dtype=float8_e4m3fn", max_cache_len=200,
                        max_batch_size=2)
    planned = cache.memory_report(torch.float16)
    keys, values = random_kv(2, 8, torch.float16)
    for i in range(2):
        cache.update(keys[i].expand(2, -1, -1, -1), values[i].expand(2, -1, -1, -1), i)
    assert cache.allocated_bytes() == planned["bytes"]


def test_memory_planner_takes_specs(capsys):
    from xquant_fx.cli.memory import main
    from xquant_fx.memory import plan

    p = plan("llama-3.1-8b", "kivi-2:metadata_dtype=float8_e4m3fn", "80GB", max_cache_len=32768)
    q = plan("llama-3.1-8b", "kivi-2", "80GB", max_cache_len=32768)
    assert p.preset.preset == "kivi-2:metadata_dtype=float8_e4m3fn"
    assert p.preset.stored_bits < q.preset.stored_bits and p.preset.max_tokens > q.preset.max_tokens
    assert main(["--config", "llama-3.1-8b", "--preset", "kivi-2:metadata_dtype=float8_e4m3fn",
                 "--gpu-memory", "80GB"]) == 0
    assert "kivi-2:metadata_dtype=float8_e4m3fn" in capsys.readouterr().out
    assert main(["--config", "llama-3.1-8b", "--preset", "kivi-2:group_size=7", "--gpu-memory", "80GB"]) == 2
    assert "XQuantConfig.group_size=7" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval tables
RUN = evaluate.RunInfo("TinyLM", 96, "segments=2 segment_len=176 prefill=128 depths=0.9 filler=20 corpus=default",
                       "torch X, transformers Y, fp32 CPU", "2026-11-01")


def rows(names, ppl0=10.0, run=RUN):
    out = [evaluate.EvalRow(name, 2.0, 3.0, ppl0 + i, 10.0 * i, 0.9, "1/1", run.scored_tokens)
           for i, name in enumerate(names)]
    return evaluate.stamp(out, run)


def test_eval_refuses_moe_options_it_would_not_apply():
    from xquant_fx import evaluate

    with pytest.raises(ValueError, match="MoE options"):
        evaluate.evaluate(None, None, ["kivi-2", "kivi-2:moe_top_k=2"])


def test_eval_table_round_trip_and_merge(tmp_path):
    old = rows(["fp16", "kivi-2", "kivi-4"])
    evaluate.save(old, tmp_path, evaluate.meta_line(old))
    assert evaluate.load_rows(tmp_path) == old
    later = evaluate.RunInfo(**{**RUN.__dict__, "date": "2026-11-02"})
    new = rows(["fp16", "kivi-4", "kivi-2:metadata_dtype=float8_e4m3fn"], run=later)
    new[1].ppl = 99.0
    merged = evaluate.merge_rows(evaluate.load_rows(tmp_path), new)
    assert [r.config for r in merged] == ["fp16", "kivi-2", "kivi-4", "kivi-2:metadata_dtype=float8_e4m3fn"]
    assert merged[2].ppl == 99.0 and merged[1] == old[1] and merged[0] == new[0]
    meta = evaluate.meta_line(merged)
    assert meta == "TinyLM, 96 scored tokens, 2026-11-01 + 2026-11-02, torch X, transformers Y, fp32 CPU"
    evaluate.save(merged, tmp_path, meta)
    assert evaluate.load_rows(tmp_path) == merged
    assert (tmp_path / "eval.md").read_text().startswith(f"# Quality, {meta}\n")


@pytest.mark.parametrize("field, value, match", [
    ("scored_tokens", 4096, "different scored_tokens"),
    ("settings", "segments=8 segment_len=640 prefill=128 depths=0.9 filler=20 corpus=default", "different settings"),
    ("model", "OtherLM", "different model"),
    ("environment", "torch Z, transformers Y, fp32 CPU", "different environment"),
])
def test_merge_refuses_rows_of_other_runs(field, value, match):
    other = evaluate.RunInfo(**{**RUN.__dict__, field: value})
    new = rows(["fp16", "kivi-2:group_size=64"], run=other)
    with pytest.raises(ValueError, match=match):
        evaluate.merge_rows(rows(["fp16", "kivi-2"]), new)


def test_merge_refuses_another_reference():
    with pytest.raises(ValueError, match="reference rows differ"):
        evaluate.merge_rows(rows(["fp16", "kivi-2"]), rows(["fp16", "kivi-4"], ppl0=10.5))


def test_legacy_table_takes_its_run_from_the_header(tmp_path):
    """A table written before rows recorded their run: model, date and environment from the
    eval.md header line, settings unknown (any settings merge, the other fields must agree)."""
    (tmp_path / "eval.csv").write_text(
        "config,code_bits,stored_bits,ppl,delta_ppl_pct,agreement,retrieval,scored_tokens\n"
        "fp16,32.0,16.0,10.0,0.0,1.0,1/1,96\nkivi-2,2.0,3.2,11.0,10.0,0.8,1/1,96\n")
    (tmp_path / "eval.md").write_text("# Quality, TinyLM, 96 scored tokens, 2026-10-30, torch X, transformers Y, "
                                      "fp32 CPU\n\n| table |\n")
    old = evaluate.load_rows(tmp_path)
    assert old[1].model == "TinyLM" and old[1].date == "2026-10-30" and old[1].settings == ""
    merged = evaluate.merge_rows(old, rows(["fp16", "kivi-4"]))
    assert [r.config for r in merged] == ["fp16", "kivi-2", "kivi-4"]
    assert evaluate.meta_line(merged).startswith("TinyLM, 96 scored tokens, 2026-10-30 + 2026-11-01, torch X")
    (tmp_path / "eval.md").write_text("# something else\n")
    with pytest.raises(ValueError, match="cannot tell whether new rows are comparable"):
        evaluate.load_rows(tmp_path)


def test_eval_command_checks_specs_and_append_before_running(tmp_path, capsys):
    from xquant_fx.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["eval", "--presets", "kivi-2:group_sise=64"])
    assert "unknown field 'group_sise'" in capsys.readouterr().err
    table = rows(["fp16", "kivi-2"])  # 96 scored tokens; the defaults score 4096: refused, no model run
    evaluate.save(table, tmp_path, evaluate.meta_line(table))
    before = (tmp_path / "eval.csv").read_text()
    assert cli_main(["eval", "--presets", "kivi-4", "--out", str(tmp_path), "--append"]) == 2
    err = capsys.readouterr().err
    assert "--append" in err and "different scored_tokens" in err
    assert (tmp_path / "eval.csv").read_text() == before
