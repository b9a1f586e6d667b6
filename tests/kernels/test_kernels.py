"""The Triton kernels against their plain-torch twins in ``xquant_fx.quant``, on CPU through
Triton's interpreter.

Append: codes, scales, zero points and windows bit-exact (``torch.equal``) over consecutive
decode steps. Attend (every variant, with and without a mask): ``max |out - ref| <= tol * max
|ref|`` with ``tol`` 1e-4 for float32 and 2e-2 for float16 / bfloat16 (the kernel multiplies
probabilities rounded to the cache dtype on the tensor cores; the reference works in float32
throughout). The packed variants' PTX (``lop3`` / packed ``fma``) runs on GPUs only; here the same
bit patterns are decoded in float32 (``benchmarks/bench_attention.py`` checks the GPU path).
"""

import os

# Triton decides at decoration time whether a kernel is interpreted, its own library
# (tl.max, tl.cdiv, ...) included: tests/conftest.py sets this before anything imports triton;
# set here too for a run of this file alone.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from xquant_fx import quant  # noqa: E402


def triton_interprets() -> bool:
    """Whether triton's own jit library was decorated for the interpreter in this process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.max, InterpretedFunction)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, decorated under the interpreter."""
    assert triton_interprets(), "triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"
    from triton.runtime.interpreter import InterpretedFunction

    from xquant_fx.kernels import append, attend, common

    if not isinstance(append._append_token_kernel, InterpretedFunction):
        # Imported earlier in this process while TRITON_INTERPRET was unset: decorate again.
        from xquant_fx.kernels import attend_mma

        for module in (common, append, attend_mma, attend):
            importlib.reload(module)
    return SimpleNamespace(append=append, attend=attend)


def make_storage(B, H, dk, dv, kb, vb, G, R, T, dtype, seed=0, vg=None):
    """A layer's storage (cache.py layout) filled with random codes, scales and windows; value
    groups of ``vg`` channels (default ``G``)."""
    gen = torch.Generator().manual_seed(seed)
    vg = vg or G
    tq = math.ceil(max(T - R, 1) / G) * G

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)

    def floats(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(shape, generator=gen) * (hi - lo) + lo).to(dtype)

    return dict(
        k_codes=words(B, H, tq * kb // 32, dk),
        k_scale=floats(B, H, tq // G, dk, lo=0.05, hi=0.5),
        k_zero=floats(B, H, tq // G, dk),
        k_window=torch.randn(B, H, R, dk, generator=gen).to(dtype),
        v_codes=words(B, H, tq, dv * vb // 32),
        v_scale=floats(B, H, tq, dv // vg, lo=0.05, hi=1.0),
        v_zero=floats(B, H, tq, dv // vg),
        v_window=torch.randn(B, H, R, dv, generator=gen).to(dtype),
    )


TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
ORDER = ("k_codes", "k_scale", "k_zero", "k_window", "v_codes", "v_scale", "v_zero", "v_window")


def storage_args(st, share_k=False, share_v=False):
    args = [st[name] for name in ORDER]
    if share_k:
        args[0] = None
    if share_v:
        args[4] = None
    return args


# --------------------------------------------------------------------------- append
APPEND_CASES = [
    # dtype, kb, vb, G, R, dk, dv, share_k, share_v, k_eta, v_eta
    pytest.param(torch.bfloat16, 2, 1, 32, 64, 64, 64, False, False, 0.045, 1 / 6, id="bf16-k2v1-eta"),
    pytest.param(torch.float16, 2, 2, 32, 64, 64, 64, False, False, 0.0, 0.0, id="fp16-k2v2"),
    pytest.param(torch.float32, 4, 4, 64, 64, 64, 128, False, True, 0.0, 0.0, id="fp32-k4v4-g64-vshare"),
    pytest.param(torch.bfloat16, 1, 2, 128, 128, 128, 128, True, False, 1 / 6, 0.045, id="bf16-k1v2-g128-kshare"),
    pytest.param(torch.float16, 1, 1, 32, 96, 128, 64, False, False, 1 / 6, 1 / 6, id="fp16-k1v1-R96"),
]


@pytest.mark.parametrize("dtype,kb,vb,G,R,dk,dv,share_k,share_v,k_eta,v_eta", APPEND_CASES)
def test_append_matches_reference(kernels, dtype, kb, vb, G, R, dk, dv, share_k, share_v, k_eta, v_eta):
    """Consecutive decode steps before, at and after ``pos == R`` and across group boundaries,
    on a storage batch larger than the step's (rows past ``b`` must stay untouched)."""
    B, b, H = 3, 2, 2
    T = R + 3 * G
    ref = make_storage(B, H, dk, dv, kb, vb, G, R, T, dtype, seed=1)
    got = {name: t.clone() for name, t in ref.items()}
    gen = torch.Generator().manual_seed(2)
    steps = [0, 1, R - 1, R, R + 1, R + G - 1, R + G, R + 2 * G]
    for pos in steps:
        k = torch.randn(b, H, 1, dk, generator=gen).to(dtype)
        # values arrive as a transposed view ([b, 1, H, D] -> [b, H, 1, D]): strided input
        v = torch.randn(b, 1, H, dv, generator=gen).to(dtype).transpose(1, 2)
        p = torch.tensor(pos)
        quant.append_token(k, v, p, *[t if t is None else t[:b] for t in storage_args(ref, share_k, share_v)],
                           kb, vb, G, k_eta, v_eta)
        kernels.append.append_token(k, v, p, *[t if t is None else t[:b] for t in storage_args(got, share_k, share_v)],
                                    kb, vb, G, k_eta, v_eta)
        for name in ORDER:
            assert torch.equal(got[name], ref[name]), f"{name} differs after the step at pos={pos}"


def test_append_refuses_strided_channels(kernels):
    """The write kernel addresses storage channels as contiguous; a storage view with a strided
    channel axis is refused by name, and nothing is written."""
    st = make_storage(1, 1, 64, 64, 2, 2, 32, 32, 96, torch.float32)
    before = {name: t.clone() for name, t in st.items()}
    wide = torch.zeros(*st["k_window"].shape[:-1], 128)
    st["k_window"] = wide[..., ::2]  # same shape, channel stride 2
    k = torch.randn(1, 1, 1, 64)
    with pytest.raises(ValueError, match="k_window must have contiguous channels"):
        kernels.append.append_token(k, k, torch.tensor(40), *storage_args(st), 2, 2, 32, 0.0, 0.0)
    assert not wide.any()
    for name in ORDER:
        if name != "k_window":
            assert torch.equal(st[name], before[name]), name


def test_append_flushes_the_window_into_codes(kernels):
    """Tokens written by the kernel from an empty cache read back (``read_keys`` /
    ``read_values``) as the reference cache does, window and codes alike."""
    B, H, dk, dv, kb, vb, G, R, T = 1, 1, 64, 64, 2, 2, 32, 32, 96
    dtype = torch.float32
    ref = {name: torch.zeros_like(t) for name, t in make_storage(B, H, dk, dv, kb, vb, G, R, T, dtype).items()}
    got = {name: t.clone() for name, t in ref.items()}
    gen = torch.Generator().manual_seed(3)
    for pos in range(R + G + 1):
        k, v = torch.randn(B, H, 1, dk, generator=gen), torch.randn(B, H, 1, dv, generator=gen)
        quant.append_token(k, v, torch.tensor(pos), *storage_args(ref), kb, vb, G, 0.0, 0.0)
        kernels.append.append_token(k, v, torch.tensor(pos), *storage_args(got), kb, vb, G, 0.0, 0.0)
    for name in ORDER:
        assert torch.equal(got[name], ref[name]), name
    n = torch.tensor(R + G + 1)
    keys = quant.read_keys(got["k_codes"], got["k_scale"], got["k_zero"], got["k_window"], n, kb, G, T)
    assert torch.isfinite(keys).all()


# --------------------------------------------------------------------------- attend
def reference_attend(q, st, k_codes, v_codes, n, kb, vb, G, scale, mask=None):
    length = st["v_scale"].shape[2] + st["v_window"].shape[2]
    nt = torch.tensor(n)
    keys = quant.read_keys(k_codes, st["k_scale"], st["k_zero"], st["k_window"], nt, kb, G, length)
    vg = quant.value_group(st["v_window"], st["v_scale"])
    values = quant.read_values(v_codes, st["v_scale"], st["v_zero"], st["v_window"], nt, vb, vg, length)
    return quant.attend(q, keys, values, nt, scale, mask)


def assert_close_rel(out, ref, tol):
    assert not out.isnan().any(), "output has NaN (unwritten elements?)"
    err = (out.float() - ref.float()).abs().max().item()
    bound = tol * ref.float().abs().max().item()
    assert err <= bound, f"max |out - ref| = {err:.3g} > {bound:.3g}"


def poison_workspace(kernels, monkeypatch):
    """Partials start as NaN, so that a partial a kernel fails to write shows in the output."""
    monkeypatch.setattr(kernels.attend, "_workspace",
                        lambda shape, device: torch.full(shape, float("nan"), device=device))


def run_attend(kernels, q, st, k_codes, v_codes, n, kb, vb, G, scale, mask=None, **launch):
    """The kernel into a NaN-filled output (every element must be written)."""
    b, hq, lq, _ = q.shape
    out = torch.full((b, hq, lq, st["v_window"].shape[-1]), float("nan"), dtype=q.dtype)
    got = kernels.attend.attend(q, k_codes, st["k_scale"], st["k_zero"], st["k_window"],
                                v_codes, st["v_scale"], st["v_zero"], st["v_window"], torch.tensor(n),
                                kb, vb, G, scale, mask, out=out, **launch)
    assert got is out and got.dtype == q.dtype
    return got


ATTEND_CASES = [
    # n, Lq, gqa, dk, dv, kb, vb, G, R, dtype, shared, splits
    pytest.param(1, 1, 4, 64, 64, 2, 1, 32, 64, torch.float32, False, None, id="n1-window-only"),
    pytest.param(31, 1, 1, 64, 64, 2, 2, 32, 64, torch.float16, False, 1, id="n31-partial-window"),
    pytest.param(33, 4, 3, 64, 64, 4, 4, 32, 32, torch.float32, False, 2, id="n33-lq4-gqa3-full-window"),
    pytest.param(64, 2, 8, 128, 128, 2, 1, 32, 64, torch.bfloat16, True, None, id="n64-eq-R-shared"),
    pytest.param(129, 1, 8, 128, 64, 2, 1, 32, 64, torch.bfloat16, False, 3, id="n129-dk128-dv64"),
    pytest.param(129, 16, 4, 64, 64, 1, 1, 64, 64, torch.float32, True, 2, id="n129-lq16-k1v1-g64"),
    pytest.param(371, 1, 4, 128, 128, 2, 1, 32, 128, torch.float16, True, None, id="n371-xquant"),
    pytest.param(371, 3, 1, 64, 128, 1, 2, 64, 64, torch.bfloat16, False, 4, id="n371-lq3-k1v2"),
    pytest.param(371, 1, 3, 64, 128, 4, 1, 128, 128, torch.float32, False, 1, id="n371-g128-single-split"),
    pytest.param(200, 8, 8, 64, 64, 2, 2, 32, 64, torch.float16, False, None, id="n200-lq8-gqa8"),
]


@pytest.mark.parametrize("n,lq,gqa,dk,dv,kb,vb,G,R,dtype,shared,splits", ATTEND_CASES)
def test_attend_matches_reference(kernels, monkeypatch, n, lq, gqa, dk, dv, kb, vb, G, R, dtype, shared, splits):
    """The default variant of each case: ragged n (window only, partial, at R, codes + window),
    GQA 1/3/4/8, head dims 64/128 (also Dk != Dv), 1/2/4 bits, Lq 1..16 (up to 128 query rows per
    KV head: the shared-block kernel), one and several splits; a sharing layer reads its partner's
    codes. Output and partials start as NaN so unwritten elements show."""
    B, b, hkv = 2, 2, 2
    T = 384
    st = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n)
    k_codes, v_codes = st["k_codes"], st["v_codes"]
    if shared:  # the partner layer's codes, with this layer's scales / zeros / windows
        partner = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n + 1000)
        k_codes, v_codes = partner["k_codes"], partner["v_codes"]
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, hkv * gqa, lq, dk, generator=gen).to(dtype)
    scale = dk**-0.5
    ref = reference_attend(q, st, k_codes, v_codes, n, kb, vb, G, scale)
    poison_workspace(kernels, monkeypatch)
    got = run_attend(kernels, q, st, k_codes, v_codes, n, kb, vb, G, scale, splits=splits)
    assert_close_rel(got, ref, TOL[dtype])


VARIANT_CASES = [
    # n, Lq, gqa, kb, vb, G, dtype
    pytest.param(450, 1, 4, 2, 1, 32, torch.bfloat16, id="bf16-k2v1"),
    pytest.param(331, 2, 3, 1, 2, 64, torch.float16, id="fp16-k1v2-lq2"),
    pytest.param(300, 1, 2, 4, 4, 32, torch.bfloat16, id="bf16-k4v4"),
    pytest.param(290, 1, 4, 2, 1, 16, torch.float16, id="fp16-g16-split-value-words"),
]


@pytest.mark.parametrize("variant", ["warps-t", "packed", "generic"])
@pytest.mark.parametrize("n,lq,gqa,kb,vb,G,dtype", VARIANT_CASES)
def test_attend_variants(kernels, monkeypatch, variant, n, lq, gqa, kb, vb, G, dtype):
    """Every kernel variant on float16 / bfloat16 caches, 1/2/4-bit codes, a group smaller than a
    1-bit value word (its two halves in different groups), several splits and a tail."""
    B, hkv, dk, dv, R, T = 2, 2, 64, 64, 64, 512
    st = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n)
    q = torch.randn(B, hkv * gqa, lq, dk, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125)
    poison_workspace(kernels, monkeypatch)
    got = run_attend(kernels, q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125, splits=2, variant=variant)
    assert_close_rel(got, ref, TOL[dtype])


@pytest.mark.parametrize("variant,kb,vb,vg,dtype", [("warps-t", 2, 1, 64, torch.bfloat16),
                                                    ("packed", 2, 2, 128, torch.float16),
                                                    ("generic", 1, 1, 128, torch.bfloat16)])
def test_value_groups_wider_than_key_groups(kernels, monkeypatch, variant, kb, vb, vg, dtype):
    """``XQuantConfig.value_group_size``: value scales of ``vg`` channels beside key groups of 32
    tokens. The write kernel stores what the reference stores (bit for bit, across a key flush),
    and each variant reads the result as the reference does; ``mma`` (32-channel groups only)
    is not the default for such a layer."""
    B, hkv, gqa, dk, dv, G, R, T = 2, 2, 4, 128, 128, 32, 64, 320
    ref = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=7, vg=vg)
    assert ref["v_scale"].shape[-1] == dv // vg
    got = {name: t.clone() for name, t in ref.items()}
    gen = torch.Generator().manual_seed(8)
    for pos in (R - 1, R, R + 1, R + G):
        k, v = (torch.randn(B, hkv, 1, d, generator=gen).to(dtype) for d in (dk, dv))
        quant.append_token(k, v, torch.tensor(pos), *storage_args(ref), kb, vb, G, 0.0, 1 / 6)
        kernels.append.append_token(k, v, torch.tensor(pos), *storage_args(got), kb, vb, G, 0.0, 1 / 6)
        for name in ORDER:
            assert torch.equal(got[name], ref[name]), f"{name} differs after the step at pos={pos}"
    n = 290
    q = torch.randn(B, hkv * gqa, 1, dk, generator=gen).to(dtype)
    expected = reference_attend(q, got, got["k_codes"], got["v_codes"], n, kb, vb, G, 0.125)
    from xquant_fx import ops

    assert_close_rel(ops.attend(q, *storage_args(got), torch.tensor(n), kb, vb, G, 0.125), expected,
                     TOL[dtype])  # the op's reference path (CPU)
    poison_workspace(kernels, monkeypatch)
    out = run_attend(kernels, q, got, got["k_codes"], got["v_codes"], n, kb, vb, G, 0.125, splits=2, variant=variant)
    assert_close_rel(out, expected, TOL[dtype])
    with pytest.raises(ValueError, match="variant 'mma' takes"):
        kernels.attend.attend(q, *storage_args(got), torch.tensor(n), kb, vb, G, 0.125, variant="mma")


MMA_CASES = [
    # n, Lq, gqa, dk, dv, kb, vb, dtype, shared, metadata
    pytest.param(230, 1, 4, 64, 64, 2, 1, torch.bfloat16, True, None, id="bf16-k2v1-shared"),
    pytest.param(171, 2, 4, 64, 64, 1, 2, torch.float16, False, torch.float8_e4m3fn, id="fp16-k1v2-lq2-fp8"),
    pytest.param(250, 1, 4, 128, 128, 2, 1, torch.bfloat16, False, None, id="bf16-k2v1-d128"),  # Llama-3-8B's
]


@pytest.mark.parametrize("n,lq,gqa,dk,dv,kb,vb,dtype,shared,metadata", MMA_CASES)
def test_attend_mma_variant(kernels, monkeypatch, n, lq, gqa, dk, dv, kb, vb, dtype, shared, metadata):
    """The ``mma`` variant (raw codes in mma fragments, scales folded into q and P; its PTX
    emulated here): ragged n with a partly used last split, 1/2-bit keys and values, GQA x Lq of
    4 and 8 rows, a sharing layer, float8 metadata."""
    B, hkv, G, R, T = 2, 2, 32, 64, 256
    st = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n)
    if metadata is not None:
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            st[name] = quant.to_metadata(st[name].float(), metadata)
    k_codes, v_codes = st["k_codes"], st["v_codes"]
    if shared:
        partner = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n + 1)
        k_codes, v_codes = partner["k_codes"], partner["v_codes"]
    q = torch.randn(B, hkv * gqa, lq, dk, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref = reference_attend(q, st, k_codes, v_codes, n, kb, vb, G, dk**-0.5)
    poison_workspace(kernels, monkeypatch)
    got = run_attend(kernels, q, st, k_codes, v_codes, n, kb, vb, G, dk**-0.5, splits=2, variant="mma")
    assert_close_rel(got, ref, TOL[dtype])


@pytest.mark.parametrize("warps,lazy,tail", [(1, False, True), (2, False, True), (4, False, True), (1, True, True),
                                             (1, True, False)])
def test_attend_mma_launch_configs(kernels, monkeypatch, warps, lazy, tail):
    """One, two and four warps per program (each warp its own groups and partial) without the
    lazy rescale, and the lazy rescale on scores that leave float32's exp2 range (rises past the
    reference max by more than 2^8 force a rescale, smaller ones do not), with stage 2 as programs
    of stage 1's launch or as a launch of its own, against the reference; an ``AttendConfig`` is
    refused for ``mma`` and an ``MmaConfig`` for the other variants."""
    B, hkv, gqa, dk, dv, kb, vb, G, R, T, n = 2, 2, 4, 64, 64, 2, 1, 32, 64, 384, 333
    dtype = torch.bfloat16
    st = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=warps)
    q = torch.randn(B, hkv * gqa, 1, dk, generator=torch.Generator().manual_seed(warps)).to(dtype)
    if lazy:
        # Key zero points of -256 + 8 (g % 5) in group g: scores (log2 units) of several hundred
        # plus or minus, whose exp2 over- or underflows float32 unless the reference max follows
        # them, and group maxima that rise by less and by more than the threshold, row by row
        # (z . q is exact: the zero points are integers that bf16 holds). The reference runs in
        # float32: in bf16 its keys c * s + z round to bf16's spacing at 256 (2), where the kernel
        # keeps z . q and (c * s) . q apart.
        groups = torch.arange(st["k_zero"].shape[2], dtype=torch.float32)
        st["k_zero"] = (-256 + 8 * (groups % 5))[None, None, :, None].expand_as(st["k_zero"]).to(dtype).contiguous()
        wide = {name: t.float() if t.is_floating_point() else t for name, t in st.items()}
        ref = reference_attend(q.float(), wide, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125).to(dtype)
    else:
        ref = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125)
    cfg = kernels.attend.attend_mma.MmaConfig(num_warps=warps, lazy=lazy, tail_programs=tail)
    poison_workspace(kernels, monkeypatch)
    got = run_attend(kernels, q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125, splits=3, config=cfg,
                     variant="mma")
    assert_close_rel(got, ref, TOL[dtype])
    with pytest.raises(ValueError, match="lazy needs num_warps=1"):
        kernels.attend.attend_mma.MmaConfig(num_warps=4, lazy=True)
    with pytest.raises(ValueError, match="does not configure variant 'mma'"):
        kernels.attend.attend(q, *storage_args(st), torch.tensor(n), kb, vb, G, 0.125, variant="mma",
                              config=kernels.attend.AttendConfig())
    with pytest.raises(ValueError, match="does not configure variant 'warps-t'"):
        kernels.attend.attend(q, *storage_args(st), torch.tensor(n), kb, vb, G, 0.125, variant="warps-t",
                              config=cfg)


def test_packed_variants_refuse_float32(kernels):
    st = make_storage(1, 1, 64, 64, 2, 2, 32, 64, 128, torch.float32)
    q = torch.randn(1, 1, 1, 64)
    with pytest.raises(ValueError, match="generic"):
        kernels.attend.attend(q, *storage_args(st), torch.tensor(70), 2, 2, 32, 0.125, variant="warps-t")


@pytest.mark.parametrize("variant,block_n,warps,stages", [
    ("warps-t", 128, 4, 2),  # 32 positions per warp
    ("warps-t", 64, 2, 1),  # two warps
    ("packed", 32, 4, 1),
    ("packed", 128, 4, 3),
    ("generic", 32, 4, 1),
])
def test_attend_launch_configs(kernels, monkeypatch, variant, block_n, warps, stages):
    """Blocks smaller and larger than G, other warp counts and pipelining depths."""
    B, hkv, gqa, lq, dk, dv, kb, vb, G, R, T, n = 1, 2, 3, 2, 64, 128, 1, 2, 64, 64, 640, 500
    dtype = torch.bfloat16
    st = make_storage(B, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=block_n)
    q = torch.randn(B, hkv * gqa, lq, dk).to(dtype)
    cfg = kernels.attend.AttendConfig(block_n=block_n, num_warps=warps, num_stages=stages)
    ref = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125)
    poison_workspace(kernels, monkeypatch)
    got = run_attend(kernels, q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125, splits=2, config=cfg,
                     variant=variant)
    assert_close_rel(got, ref, TOL[dtype])


def test_attend_strided_query_and_storage_slice(kernels):
    """q as a transposed view and storage with a larger batch than q (the cache's ``[:b]``)."""
    B, b, hkv, gqa, lq, d, kb, vb, G, R, T, n = 3, 2, 2, 4, 2, 64, 2, 2, 32, 64, 256, 150
    for dtype in (torch.float32, torch.bfloat16):
        st = make_storage(B, hkv, d, d, kb, vb, G, R, T, dtype, seed=5)
        q = torch.randn(b, lq, hkv * gqa, d).to(dtype).transpose(1, 2)  # [b, Hq, Lq, D], not contiguous
        got = kernels.attend.attend(q, *storage_args(st), torch.tensor(n), kb, vb, G, 0.1)
        ref = reference_attend(q, {k: t[:b] for k, t in st.items()}, st["k_codes"][:b], st["v_codes"][:b],
                               n, kb, vb, G, 0.1)
        assert_close_rel(got, ref, TOL[dtype])


# --------------------------------------------------------------------------- attend with a mask
def left_padding_mask(b, lq, M, pads):
    """Bool ``[b, 1, Lq, M]``: row ``i`` ignores its first ``pads[i]`` positions (left padding)."""
    pos = torch.arange(M)
    return (pos[None, :] >= torch.tensor(pads)[:, None])[:, None, None, :].expand(b, 1, lq, M).clone()


MASK_CASES = [
    # n, Lq, gqa, kb, vb, dtype, kind, M, variant
    pytest.param(371, 1, 4, 2, 1, torch.bfloat16, "bool", 380, None, id="bool-leftpad-bf16"),
    pytest.param(371, 1, 4, 2, 1, torch.bfloat16, "bool", 380, "packed", id="bool-leftpad-packed"),
    pytest.param(300, 3, 2, 2, 2, torch.float16, "bool", 512, "warps-t", id="bool-lq3-fp16-M-eq-capacity"),
    pytest.param(371, 1, 4, 2, 1, torch.float32, "float", 400, None, id="additive-inf-fp32"),
    pytest.param(250, 2, 4, 1, 2, torch.bfloat16, "finfo", 260, None, id="additive-finfo-min-bf16"),
    pytest.param(333, 1, 2, 4, 1, torch.float16, "heads", 336, "warps-t", id="per-head-bool"),
    pytest.param(290, 1, 4, 2, 1, torch.bfloat16, "strided", 300, "generic", id="strided-float-generic"),
    pytest.param(371, 1, 4, 2, 1, torch.bfloat16, "long", 700, None, id="mask-longer-than-capacity"),
    pytest.param(371, 1, 4, 2, 1, torch.bfloat16, "bool", 380, "mma", id="bool-leftpad-mma"),
    pytest.param(250, 1, 4, 1, 2, torch.float16, "finfo", 260, "mma", id="additive-finfo-mma"),
]


@pytest.mark.parametrize("n,lq,gqa,kb,vb,dtype,kind,M,variant", MASK_CASES)
def test_attend_with_mask(kernels, monkeypatch, n, lq, gqa, kb, vb, dtype, kind, M, variant):
    """Masks as transformers passes them to SDPA, against ``quant.attend(..., mask)``: bool left
    padding (some rows padded past stage 1's first blocks, one not at all), additive 0 / -inf and
    0 / dtype-minimum, per-head masks, a strided slice of a larger mask, ``M`` below the cache
    capacity (positions past ``M`` masked) and above it. Outputs and partials start as NaN."""
    b, hkv, dk, dv, G, R, T = 2, 2, 64, 64, 32, 64, 512
    st = make_storage(b, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n + M)
    hq = hkv * gqa
    q = torch.randn(b, hq, lq, dk, generator=torch.Generator().manual_seed(11)).to(dtype)
    pads = [0, 97]
    keep = left_padding_mask(b, lq, M, pads)
    if kind in ("bool", "long"):
        mask = keep
    elif kind == "float":
        mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    elif kind == "finfo":
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    elif kind == "heads":  # each head its own padding
        mask = torch.stack([left_padding_mask(b, lq, M, [3 * h, 40 + h])[:, 0] for h in range(hq)], dim=1)
    else:  # "strided": the first M positions of a wider additive mask
        wide = torch.zeros(b, 1, lq, M + 37, dtype=dtype)
        wide[..., :M].masked_fill_(~keep, float("-inf"))
        mask = wide[..., :M]
    ref = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, dk**-0.5, mask)
    poison_workspace(kernels, monkeypatch)
    launch = dict(splits=3) if variant is None else dict(splits=3, variant=variant)
    got = run_attend(kernels, q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, dk**-0.5, mask, **launch)
    assert_close_rel(got, ref, TOL[dtype])


SINK_CASES = [
    # n, Lq, gqa, kb, vb, S, dtype, variant, mask kind
    pytest.param(371, 1, 4, 2, 1, 4, torch.bfloat16, None, None, id="n371-s4-default"),
    pytest.param(371, 1, 4, 2, 1, 4, torch.bfloat16, "warps-t", None, id="n371-s4-warps-t"),
    pytest.param(300, 2, 3, 2, 2, 8, torch.float16, "packed", None, id="n300-lq2-s8-packed"),
    pytest.param(290, 1, 2, 1, 2, 3, torch.float32, "generic", None, id="n290-s3-generic-fp32"),
    pytest.param(40, 1, 4, 2, 1, 4, torch.bfloat16, None, None, id="n40-window-only"),
    pytest.param(3, 2, 2, 2, 1, 6, torch.float16, None, None, id="n3-lq2-fewer-tokens-than-sinks"),
    pytest.param(371, 1, 4, 2, 1, 4, torch.bfloat16, None, "bool", id="n371-s4-left-padding"),
    pytest.param(250, 2, 4, 1, 2, 4, torch.float16, "warps-t", "finfo", id="n250-s4-additive-finfo"),
    pytest.param(371, 1, 4, 2, 1, 4, torch.bfloat16, "mma", "bool", id="n371-s4-left-padding-mma"),
    pytest.param(200, 2, 2, 1, 2, 8, torch.float16, "mma", None, id="n200-lq2-s8-mma"),
]


@pytest.mark.parametrize("n,lq,gqa,kb,vb,S,dtype,variant,kind", SINK_CASES)
def test_attend_with_sink_tokens(kernels, monkeypatch, n, lq, gqa, kb, vb, S, dtype, variant, kind):
    """Sink tokens (``XQuantConfig.sink_tokens``): positions < S come from the sink buffers, not
    from the codes or the ring, against ``quant.attend`` over reads merged with the sinks
    (``quant.merge_sink``); with masks (left padding over the sinks of one row), fewer stored
    tokens than sinks, several variants. Outputs and partials start as NaN."""
    b, hkv, dk, dv, G, R, T = 2, 2, 64, 64, 32, 64, 512
    st = make_storage(b, hkv, dk, dv, kb, vb, G, R, T, dtype, seed=n + S)
    gen = torch.Generator().manual_seed(5)
    k_sink = (3 * torch.randn(b, hkv, S, dk, generator=gen)).to(dtype)  # far from the codes' keys
    v_sink = torch.randn(b, hkv, S, dv, generator=gen).to(dtype)
    hq = hkv * gqa
    q = torch.randn(b, hq, lq, dk, generator=gen).to(dtype)
    mask = None
    if kind is not None:
        keep = left_padding_mask(b, lq, n + 5, [0, 2])  # row 1 pads two of its sinks
        mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    length = st["v_scale"].shape[2] + R
    nt = torch.tensor(n)
    keys = quant.merge_sink(quant.read_keys(st["k_codes"], st["k_scale"], st["k_zero"], st["k_window"], nt, kb, G,
                                            length), k_sink)
    values = quant.merge_sink(quant.read_values(st["v_codes"], st["v_scale"], st["v_zero"], st["v_window"], nt, vb,
                                                G, length), v_sink)
    ref = quant.attend(q, keys, values, nt, dk**-0.5, mask)
    poison_workspace(kernels, monkeypatch)
    launch = dict(splits=3, k_sink=k_sink, v_sink=v_sink)
    if variant is not None:
        launch["variant"] = variant
    got = run_attend(kernels, q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, dk**-0.5, mask, **launch)
    assert_close_rel(got, ref, TOL[dtype])
    # the sinks matter: attention over the plain reads differs
    plain = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, dk**-0.5, mask)
    assert (plain.float() - ref.float()).abs().max() > 10 * TOL[dtype] * ref.float().abs().max()


def test_attend_sink_arguments_are_checked(kernels):
    b, hkv, d, kb, vb, G, R, T = 1, 2, 64, 2, 1, 32, 64, 256
    st = make_storage(b, hkv, d, d, kb, vb, G, R, T, torch.float16, seed=2)
    q = torch.randn(b, 2 * hkv, 1, d).half()
    args = (q, *storage_args(st), torch.tensor(100), kb, vb, G, 0.125)
    sink = torch.zeros(b, hkv, 4, d, dtype=torch.float16)
    with pytest.raises(ValueError, match="both k_sink and v_sink"):
        kernels.attend.attend(*args, k_sink=sink)
    with pytest.raises(ValueError, match="v_sink"):
        kernels.attend.attend(*args, k_sink=sink, v_sink=sink.float())


def test_mma_refuses_a_mask_its_rows_do_not_share(kernels):
    """``mma`` loads one mask row per program: a per-head mask across a GQA group is refused
    when asked for by name, and the default variant takes another kernel."""
    b, hkv, gqa, d, kb, vb, G, R, T, n = 2, 2, 2, 64, 2, 1, 32, 64, 256, 200
    st = make_storage(b, hkv, d, d, kb, vb, G, R, T, torch.bfloat16, seed=4)
    q = torch.randn(b, hkv * gqa, 1, d).to(torch.bfloat16)
    per_head = torch.stack([left_padding_mask(b, 1, n, [h, 2 * h])[:, 0] for h in range(hkv * gqa)], dim=1)
    args = (q, *storage_args(st), torch.tensor(n), kb, vb, G, 0.125, per_head)
    with pytest.raises(ValueError, match="query rows of a KV head share"):
        kernels.attend.attend(*args, variant="mma")
    ref = reference_attend(q, st, st["k_codes"], st["v_codes"], n, kb, vb, G, 0.125, per_head)
    assert_close_rel(kernels.attend.attend(*args), ref, TOL[torch.bfloat16])


def test_mask_changes_the_result(kernels):
    """The padded row differs from the unmasked attention (the mask is not ignored) and the
    unpadded row does not."""
    b, hkv, gqa, d, kb, vb, G, R, T, n = 2, 2, 4, 64, 2, 1, 32, 64, 512, 371
    st = make_storage(b, hkv, d, d, kb, vb, G, R, T, torch.float32, seed=1)
    q = torch.randn(b, hkv * gqa, 1, d)
    args = (q, *storage_args(st), torch.tensor(n), kb, vb, G, 0.125)
    plain = kernels.attend.attend(*args)
    masked = kernels.attend.attend(*args, left_padding_mask(b, 1, 400, [0, 150]))
    assert torch.allclose(masked[0], plain[0], atol=1e-5)
    assert (masked[1] - plain[1]).abs().max() > 1e-2


def test_attend_splits_are_static(kernels):
    """The split count depends on capacity and batch x heads, never on n; it fills the resident
    program slots."""
    assert kernels.attend.num_splits(4, 4096, torch.device("cpu")) == kernels.attend.num_splits(4, 4096, "cpu")
    assert kernels.attend.num_splits(1, 100, torch.device("cpu")) == 1
    resident = kernels.attend.INTERPRETER_SMS * 3
    for heads in (1, 2, 5, 8):
        s = kernels.attend.num_splits(heads, 1 << 16, "cpu", ctas_per_sm=3)
        rounds = -(-heads * s // resident)
        assert heads * s >= resident and heads * s / (rounds * resident) >= kernels.attend.MIN_ROUND_FILL


def test_ops_run_the_kernels_under_the_interpreter(kernels, monkeypatch):
    """``xquant::append_token`` / ``xquant::attend`` take the kernel path when forced (``attend``
    with and without a mask) and agree with the reference."""
    import xquant_fx.ops as ops

    monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
    assert ops.uses_kernels(torch.empty(1))

    B, H, gqa, d, kb, vb, G, R, T = 1, 2, 2, 64, 2, 1, 32, 32, 160
    dtype = torch.bfloat16
    ref = make_storage(B, H, d, d, kb, vb, G, R, T, dtype, seed=11)
    got = {name: t.clone() for name, t in ref.items()}
    pos = torch.tensor(R + G)
    k, v = torch.randn(B, H, 1, d).to(dtype), torch.randn(B, H, 1, d).to(dtype)
    quant.append_token(k, v, pos, *storage_args(ref, share_v=True), kb, vb, G, 0.045, 1 / 6)
    torch.ops.xquant.append_token(k, v, pos, *storage_args(got, share_v=True), kb, vb, G, 0.045, 1 / 6)
    for name in ORDER:
        assert torch.equal(got[name], ref[name]), name

    n = R + G + 1
    q = torch.randn(B, H * gqa, 1, d).to(dtype)
    calls = []
    monkeypatch.setattr(ops.quant, "attend", lambda *a: calls.append("reference"))
    out = torch.ops.xquant.attend(q, *storage_args(got), torch.tensor(n), kb, vb, G, 0.125)
    mask = left_padding_mask(B, 1, n + 3, [9])
    out_masked = torch.ops.xquant.attend(q, *storage_args(got), torch.tensor(n), kb, vb, G, 0.125, mask)
    assert calls == []
    monkeypatch.undo()
    expect = reference_attend(q, got, got["k_codes"], got["v_codes"], n, kb, vb, G, 0.125)
    assert_close_rel(out, expect, TOL[dtype])
    expect = reference_attend(q, got, got["k_codes"], got["v_codes"], n, kb, vb, G, 0.125, mask)
    assert_close_rel(out_masked, expect, TOL[dtype])
    # with sink tokens: the kernels against the op's own reference branch
    k_sink, v_sink = torch.randn(B, H, 4, d).to(dtype), torch.randn(B, H, 4, d).to(dtype)
    args = (q, *storage_args(got), torch.tensor(n), kb, vb, G, 0.125, mask, k_sink, v_sink)
    monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
    out_sinks = torch.ops.xquant.attend(*args)
    monkeypatch.delenv("XQUANT_FORCE_KERNELS")
    assert_close_rel(out_sinks, torch.ops.xquant.attend(*args), TOL[dtype])



@pytest.mark.parametrize("capacity,tail,launches", [
    (1024, None, ["_attend_mma_kernel", "_attend_merge_kernel"]),
    (8192, None, ["_attend_mma_kernel", "_attend_merge_kernel"]),
    (8192 + 2048, None, ["_attend_mma_kernel", "_attend_kernel", "_attend_merge_kernel"]),
    (1024, False, ["_attend_mma_kernel", "_attend_kernel", "_attend_merge_kernel"]),
    (8192 + 2048, True, ["_attend_mma_kernel", "_attend_merge_kernel"]),
])
def test_mma_tail_programs_follow_the_capacity(kernels, monkeypatch, capacity, tail, launches):
    """``mma`` runs stage 2 as programs of stage 1's launch up to ``MMA_TAIL_PROGRAMS_CAPACITY``
    positions of cache (two launches), as a launch of its own above (three); an explicit
    ``MmaConfig.tail_programs`` overrides the rule. Recorded launches, nothing run."""
    B, H, gqa, d, kb, vb, G, R = 2, 2, 4, 64, 2, 1, 32, 128
    st = make_storage(B, H, d, d, kb, vb, G, R, capacity, torch.bfloat16, seed=5)
    names, grids = [], []
    monkeypatch.setattr(kernels.attend, "launch",
                        lambda kernel: type("Grid", (), {"__getitem__": lambda self, grid: (
                            lambda *args, **kwargs: (names.append(kernel.__name__), grids.append(grid)))})())
    q = torch.zeros(B, H * gqa, 1, d, dtype=torch.bfloat16)
    cfg = kernels.attend.attend_mma.MmaConfig(tail_programs=tail)
    kernels.attend.attend(q, *storage_args(st), torch.tensor(capacity - 7), kb, vb, G, 0.125, variant="mma",
                          splits=3, config=cfg)
    assert names == launches
    fused = len(launches) == 2
    tail_block = 16 if fused else kernels.attend.TAIL_BLOCK_N  # one key word's positions at 2 bits
    assert grids[0] == (B * H, 3 + (R + 32) // tail_block if fused else 3)


@pytest.mark.parametrize("variant", ["warps-t", "mma", "packed"])
def test_attend_host_code_does_not_specialize_on_the_batch(kernels, monkeypatch, variant):
    """Under ``torch.compile`` with a dynamic batch the host code sees ``b`` as a SymInt (in the
    decomposed ``xquant::attend``): split count, grids, workspaces and the merge take it through
    arithmetic only (no ``if`` or ``int()`` on it), so the guards that mention it hold for every
    batch size and one compiled graph serves them all. Traced here with symbolic shapes
    (``make_fx``), the launches recorded, not run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    B, H, gqa, d, kb, vb, G, R, T = 4, 2, 4, 64, 2, 1, 32, 32, 8192
    st = make_storage(B, H, d, d, kb, vb, G, R, T, torch.bfloat16, seed=21)
    monkeypatch.setattr(kernels.attend, "INTERPRETER_SMS", 132)  # an H200's: many split counts to choose from
    grids = []
    monkeypatch.setattr(kernels.attend, "launch",
                        lambda kernel: type("Grid", (), {"__getitem__": lambda self, grid: (
                            lambda *args, **kwargs: grids.append(grid))})())

    def host(q, n, *storage):
        return kernels.attend.attend(q, *storage, n, kb, vb, G, 0.125, variant=variant)

    q = torch.zeros(3, H * gqa, 1, d, dtype=torch.bfloat16)
    gm = make_fx(host, tracing_mode="symbolic")(q, torch.tensor(200), *storage_args(st))
    batch = next(node for node in gm.graph.nodes if node.op == "placeholder").meta["val"].shape[0]
    # three launches; two for mma, whose stage 2 runs as programs of stage 1's launch
    assert isinstance(batch, torch.SymInt) and len(grids) == (2 if variant == "mma" else 3)
    assert all(isinstance(grid[0], torch.SymInt) for grid in grids)
    # Guards that mention the batch (tensor sizes >= 2, Max(1, x) == x in the workspaces' strides)
    # must hold for every batch size, or a new one would recompile.
    (symbol,) = batch.node.expr.free_symbols
    hints = dict(getattr(gm.shape_env, "backed_var_to_val", None) or gm.shape_env.var_to_val)
    for guard in gm.shape_env.guards:
        if symbol in guard.expr.free_symbols:
            for b in (1, 2, 5, 8, 64, 1000):
                assert bool(guard.expr.xreplace({**hints, symbol: b})), f"batch {b} fails the guard {guard.expr}"
