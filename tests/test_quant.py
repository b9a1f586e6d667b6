"""Reference math: packing, the group quantizer, calibration, boundaries."""

import math

import pytest
import torch

from xquant_fx import quant


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n_words", [1, 3, 7])
def test_pack_unpack_round_trip(bits, n_words):
    g = torch.Generator().manual_seed(bits * 10 + n_words)
    per = 32 // bits
    codes = torch.randint(0, 2**bits, (2, 3, n_words * per, 5), generator=g, dtype=torch.uint8)
    for dim in (-2, 2):
        words = quant.pack(codes, bits, dim=dim)
        assert words.dtype == torch.int32
        assert words.shape[2] == n_words
        assert torch.equal(quant.unpack(words, bits, dim=dim), codes)
    flat = codes.transpose(-1, -2).contiguous()
    assert torch.equal(quant.unpack(quant.pack(flat, bits, -1), bits, -1), flat)


def test_pack_bit_layout_and_sign_bit():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 31] = 1  # the top bit of the word
    codes[0, 0] = 1
    word = quant.pack(codes, 1)
    assert word.item() == -(2**31) + 1
    c2 = torch.tensor([[3, 0, 1, 2] + [0] * 12], dtype=torch.uint8)
    assert quant.pack(c2, 2).item() == 3 | (1 << 4) | (2 << 6)


def test_pack_rejects_partial_words():
    with pytest.raises(ValueError, match="multiple of 16"):
        quant.pack(torch.zeros(1, 20, dtype=torch.uint8), 2)


def _naive_group(values, bits, eta):
    """Scalar loop over one group, written from the formulas of DESIGN §2."""
    mn, mx = min(values), max(values)
    lv = 2**bits - 1
    rng = mx - mn
    s = rng / lv
    codes = [0 if rng == 0 else min(max(math.floor((x - mn) * (lv / rng) + 0.5), 0), lv) for x in values]
    return codes, (1 - 2 * eta) * s, mn + eta * lv * s


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("eta", [0.0, 0.09, 1 / 6])
def test_quantize_groups_matches_naive_loop(bits, eta):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 32, generator=g, dtype=torch.float64).float()
    x[0, 0] = 0.75  # an all-constant group
    codes, scale, zero = quant.quantize_groups(x, bits, eta)
    for i in range(3):
        for j in range(5):
            c, s, z = _naive_group([float(v) for v in x[i, j]], bits, eta)
            assert codes[i, j].tolist() == c
            assert scale[i, j].item() == pytest.approx(s, rel=1e-6, abs=1e-12)
            assert zero[i, j].item() == pytest.approx(z, rel=1e-6, abs=1e-7)
    assert torch.all(codes[0, 0] == 0) and scale[0, 0] == 0 and zero[0, 0] == 0.75


def test_round_to_nearest_error_bound():
    x = torch.randn(64, 32)
    for bits in (1, 2, 4):
        codes, scale, zero = quant.quantize_groups(x, bits)
        err = (quant.dequantize_groups(codes, scale, zero) - x).abs()
        assert torch.all(err <= scale[:, None] / 2 + 1e-6)


def test_calibration_formula():
    scale, zero = torch.tensor([0.3, 2.0]), torch.tensor([-1.0, 0.5])
    for bits, eta in ((1, 1 / 6), (2, 0.045), (4, 0.0)):
        s_hat, z_hat = quant.calibrate(scale, zero, bits, eta)
        assert torch.allclose(s_hat, (1 - 2 * eta) * scale)
        assert torch.allclose(z_hat, zero + eta * scale * (2**bits - 1))
    # Codes unchanged, range moved inward symmetrically: the calibrated grid is centred on the old one.
    x = torch.randn(8, 32)
    c0, s0, z0 = quant.quantize_groups(x, 2, 0.0)
    c1, s1, z1 = quant.quantize_groups(x, 2, 0.09)
    assert torch.equal(c0, c1)
    assert torch.allclose(z1 + 1.5 * s1, z0 + 1.5 * s0, atol=1e-6)  # grid centre, levels/2 = 1.5


def test_keys_per_channel_values_per_token():
    k = torch.randn(2, 3, 64, 8)
    codes, scale, zero = quant.quantize_keys(k, 2, 32)
    assert codes.shape == k.shape and scale.shape == (2, 3, 2, 8)
    ref_codes, ref_scale, _ = quant.quantize_groups(k[0, 1, 32:64, 5], 2)
    assert torch.equal(codes[0, 1, 32:64, 5], ref_codes) and scale[0, 1, 1, 5] == ref_scale
    v = torch.randn(2, 3, 5, 64)
    codes, scale, zero = quant.quantize_values(v, 1, 32)
    assert scale.shape == (2, 3, 5, 2)
    ref_codes, ref_scale, _ = quant.quantize_groups(v[1, 2, 4, 32:], 1)
    assert torch.equal(codes[1, 2, 4, 32:], ref_codes) and scale[1, 2, 4, 1] == ref_scale
    deq = quant.dequantize_keys(*quant.quantize_keys(k, 4, 32), 32)
    assert (deq - k).abs().max() < 0.5


@pytest.mark.parametrize("n,expected_k,expected_v", [(0, 0, 0), (128, 0, 0), (129, 32, 1), (160, 32, 32), (161, 64, 33)])
def test_boundaries(n, expected_k, expected_v):
    assert quant.key_boundary(n, 128, 32) == expected_k
    assert quant.value_boundary(n, 128) == expected_v
    assert quant.key_boundary(torch.tensor(n), 128, 32).item() == expected_k
    assert quant.value_boundary(torch.tensor(n), 128).item() == expected_v
