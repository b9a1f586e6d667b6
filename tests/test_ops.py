"""The ``xquant::`` custom ops: registration checks (``torch.library.opcheck``) and dispatch.

Run on CPU without ``XQUANT_FORCE_KERNELS``, so the ops take the ``xquant_fx.quant`` reference
path.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xquant_fx.ops as ops
from xquant_fx import quant

ORDER = ("k_codes", "k_scale", "k_zero", "k_window", "v_codes", "v_scale", "v_zero", "v_window")


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.delenv("XQUANT_FORCE_KERNELS", raising=False)


def make_storage(B=2, H=2, dk=64, dv=64, kb=2, vb=1, G=32, R=64, T=256, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq = math.ceil(max(T - R, 1) / G) * G

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)

    return dict(
        k_codes=words(B, H, tq * kb // 32, dk),
        k_scale=(torch.rand(B, H, tq // G, dk, generator=gen) * 0.5).to(dtype),
        k_zero=torch.randn(B, H, tq // G, dk, generator=gen).to(dtype),
        k_window=torch.randn(B, H, R, dk, generator=gen).to(dtype),
        v_codes=words(B, H, tq, dv * vb // 32),
        v_scale=torch.rand(B, H, tq, dv // G, generator=gen).to(dtype),
        v_zero=torch.randn(B, H, tq, dv // G, generator=gen).to(dtype),
        v_window=torch.randn(B, H, R, dv, generator=gen).to(dtype),
    )


@pytest.mark.parametrize("share_k,share_v", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("pos", [5, 64, 96, 97])
def test_opcheck_append_token(pos, share_k, share_v):
    st = make_storage()
    args = [st[name] for name in ORDER]
    if share_k:
        args[0] = None
    if share_v:
        args[4] = None
    k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
    torch.library.opcheck(torch.ops.xquant.append_token.default,
                          (k, v, torch.tensor(pos), *args, 2, 1, 32, 0.045, 1 / 6))


@pytest.mark.parametrize("n,lq", [(1, 1), (100, 3), (256, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_attend(n, lq, dtype):
    st = make_storage(dtype=dtype)
    q = torch.randn(2, 8, lq, 64).to(dtype)
    torch.library.opcheck(torch.ops.xquant.attend.default,
                          (q, *[st[name] for name in ORDER], torch.tensor(n), 2, 1, 32, 0.125))


def test_opcheck_attend_and_reads_with_sinks():
    st = make_storage()
    q = torch.randn(2, 8, 1, 64)
    k_sink, v_sink = torch.randn(2, 2, 4, 64), torch.randn(2, 2, 4, 64)
    args = (q, *[st[name] for name in ORDER], torch.tensor(150), 2, 1, 32, 0.125, None, k_sink, v_sink)
    torch.library.opcheck(torch.ops.xquant.attend.default, args)
    read = (st["k_codes"], st["k_scale"], st["k_zero"], st["k_window"], torch.tensor(150), 2, 32, 256, k_sink)
    torch.library.opcheck(torch.ops.xquant.read_keys.default, read)
    keys = torch.ops.xquant.read_keys(*read)
    plain = torch.ops.xquant.read_keys(*read[:-1])
    assert torch.equal(keys[:, :, :4], k_sink) and torch.equal(keys[:, :, 4:], plain[:, :, 4:])
    # attend with sinks is attention over the reads merged with them
    values = torch.ops.xquant.read_values(st["v_codes"], st["v_scale"], st["v_zero"], st["v_window"],
                                          torch.tensor(150), 1, 32, 256, v_sink)
    assert torch.allclose(torch.ops.xquant.attend(*args), quant.attend(q, keys, values, torch.tensor(150), 0.125))
    with pytest.raises(ValueError, match="both k_sink and v_sink"):
        torch.ops.xquant.attend(*args[:-1])


def test_cpu_dispatches_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(ops.quant, "append_token", lambda *a: calls.append("append_token"))
    real_attend = quant.attend
    monkeypatch.setattr(ops.quant, "attend", lambda *a: calls.append("attend") or real_attend(*a))
    st = make_storage()
    args = [st[name] for name in ORDER]
    torch.ops.xquant.append_token(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64), torch.tensor(3),
                                  *args, 2, 1, 32, 0.0, 0.0)
    out = torch.ops.xquant.attend(torch.randn(2, 4, 1, 64), *args, torch.tensor(10), 2, 1, 32, 0.125)
    assert calls == ["append_token", "attend"]
    assert out.shape == (2, 4, 1, 64) and out.dtype == torch.float32
    assert not ops.uses_kernels(out)


def test_force_flag_selects_the_kernels(monkeypatch):
    assert not ops.uses_kernels(torch.empty(1))
    monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
    assert ops.uses_kernels(torch.empty(1))


def test_append_token_op_matches_quant():
    ref, got = make_storage(seed=3), make_storage(seed=3)
    k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
    quant.append_token(k, v, torch.tensor(96), *[ref[n] for n in ORDER], 2, 1, 32, 0.045, 1 / 6)
    torch.ops.xquant.append_token(k, v, torch.tensor(96), *[got[n] for n in ORDER], 2, 1, 32, 0.045, 1 / 6)
    for name in ORDER:
        assert torch.equal(got[name], ref[name]), name


def test_import_does_not_touch_cuda_or_triton():
    """``import xquant_fx`` pulls in no triton; ``import xquant_fx.ops`` initialises no CUDA."""
    code = (
        "import sys, torch\n"
        "import xquant_fx\n"
        "assert 'triton' not in sys.modules, 'xquant_fx imported triton'\n"
        "import xquant_fx.ops\n"
        "assert 'xquant_fx.kernels.attend' not in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("kind", ["keys", "values"])
def test_read_ops_opcheck_and_match_quant(kind):
    st = make_storage(seed=5)
    prefix = kind[0]
    args = (st[f"{prefix}_codes"], st[f"{prefix}_scale"], st[f"{prefix}_zero"], st[f"{prefix}_window"],
            torch.tensor(200), 2 if kind == "keys" else 1, 32, 256)
    op = getattr(torch.ops.xquant, f"read_{kind}")
    torch.library.opcheck(op.default, args)
    assert torch.equal(op(*args), getattr(quant, f"read_{kind}")(*args))


def test_attend_op_with_mask_matches_quant():
    st = make_storage(seed=6)
    args = [st[n] for n in ORDER]
    q = torch.randn(2, 4, 1, 64)
    mask = torch.ones(2, 1, 1, 256, dtype=torch.bool)
    mask[1, :, :, :40] = False  # a left-padded second sequence
    out = torch.ops.xquant.attend(q, *args, torch.tensor(200), 2, 1, 32, 0.125, mask)
    keys = quant.read_keys(*args[:4], torch.tensor(200), 2, 32, 256)
    values = quant.read_values(*args[4:], torch.tensor(200), 1, 32, 256)
    assert torch.allclose(out, quant.attend(q, keys, values, torch.tensor(200), 0.125, mask), atol=1e-6)
    assert not torch.allclose(out[1], quant.attend(q, keys, values, torch.tensor(200), 0.125)[1], atol=1e-4)
    additive = torch.zeros(2, 1, 1, 256).masked_fill(~mask, float("-inf"))
    assert torch.allclose(torch.ops.xquant.attend(q, *args, torch.tensor(200), 2, 1, 32, 0.125, additive), out, atol=1e-6)
    torch.library.opcheck(torch.ops.xquant.attend.default, (q, *args, torch.tensor(200), 2, 1, 32, 0.125, mask))
