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
    """Scalar loop over one group, written from the formulas of docs/how-it-works.md ("The method")."""
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


# --------------------------------------------------------------------------- quality options
def test_fit_levels_is_the_least_squares_affine_fit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 32, generator=g)
    codes = torch.randint(0, 4, (50, 32), generator=g, dtype=torch.uint8)
    codes[0] = 2  # all codes equal: scale 0, zero point the mean
    scale, zero = quant.fit_levels(x, codes)
    assert scale[0] == 0 and zero[0] == pytest.approx(x[0].mean().item(), abs=1e-6)
    for i in range(1, 50):
        a = torch.stack([codes[i].double(), torch.ones(32, dtype=torch.float64)], 1)
        want = torch.linalg.lstsq(a, x[i].double()[:, None]).solution[:, 0]
        assert scale[i].item() == pytest.approx(want[0].item(), abs=1e-5)
        assert zero[i].item() == pytest.approx(want[1].item(), abs=1e-5)


def test_lsq_one_bit_levels_are_the_half_means_and_beat_calibrated_minmax():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 32, generator=g) * torch.rand(400, 1, generator=g) * 3
    codes, scale, zero = quant.quantize_groups(x, 1, fit="lsq")
    deq = quant.dequantize_groups(codes, scale, zero)
    for i in range(0, 400, 37):
        hi = codes[i].bool()
        assert deq[i][hi].unique().numel() == 1 and deq[i][hi][0] == pytest.approx(x[i][hi].mean().item(), abs=1e-5)
        assert deq[i][~hi][0] == pytest.approx(x[i][~hi].mean().item(), abs=1e-5)
        assert x[i][hi].min() >= x[i][~hi].max()  # a threshold split, as the nearest-level step makes it
    for bits in (1, 2):
        err_lsq = (quant.dequantize_groups(*quant.quantize_groups(x, bits, fit="lsq")) - x).pow(2).mean()
        for eta in (0.0, 1 / 6, 1 / 4, 0.045, 0.09):
            err = (quant.dequantize_groups(*quant.quantize_groups(x, bits, eta)) - x).pow(2).mean()
            assert err_lsq < err, (bits, eta)


def test_lsq_with_given_codes_fits_to_them():
    g = torch.Generator().manual_seed(5)
    x, partner = torch.randn(2, 10, 32, generator=g)
    given = quant.quantize_groups(partner, 2, fit="lsq")[0]
    codes, scale, zero = quant.quantize_groups(x, 2, fit="lsq", codes=given)
    assert codes is given
    assert torch.equal(torch.stack(quant.fit_levels(x, given)), torch.stack([scale, zero]))
    with pytest.raises(ValueError, match="given codes need fit='lsq'"):
        quant.quantize_groups(x, 2, codes=given)


@pytest.mark.parametrize("d", [1, 2, 64, 128])
def test_hadamard_is_orthogonal_and_its_own_inverse(d):
    h = quant.hadamard_matrix(d)
    assert torch.allclose(h @ h, torch.eye(d), atol=1e-6) and torch.equal(h, h.T)
    assert torch.all(h.abs() == h[0, 0].abs())  # every entry +-1/sqrt(d): spreads each channel evenly
    x = torch.randn(3, d, dtype=torch.float64)
    assert quant.hadamard(x).dtype == torch.float64
    assert torch.allclose(quant.hadamard(quant.hadamard(x)), x, atol=1e-6)


@pytest.mark.parametrize("d", [1, 2, 8, 64, 256])
def test_hadamard_matrix_is_sylvesters(d):
    """The closed form ``(-1)^popcount(i & j) / sqrt(d)`` is the Sylvester recursion
    ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, which the caches' stored rotations were defined by."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert torch.equal(quant.hadamard_matrix(d), h * (1.0 / math.sqrt(d)))


@pytest.mark.parametrize("shape,dtype", [((3, 1), torch.float32), ((2, 4, 64), torch.float32),
                                         ((2, 3, 1, 128), torch.bfloat16), ((5, 256), torch.float16)])
def test_hadamard_butterfly_is_the_matrix_product(shape, dtype):
    """The fast transform that compiled graphs run gives ``x @ H`` (float32 rounding apart)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got, want = quant.hadamard_butterfly(x), quant.hadamard(x)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="power of two"):
        quant.hadamard_butterfly(torch.zeros(2, 96))


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(ValueError, match="d=96 must be a power of two"):
        quant.hadamard_matrix(96)


def test_append_sink_masked_write_and_key_stand_in():
    S, R = 3, 8
    sink, window = torch.zeros(1, 1, S, 2), torch.zeros(1, 1, R, 2)
    for p in range(6):
        x = torch.full((1, 1, 1, 2), float(p + 1))
        quant.append_sink(x, torch.tensor(p), sink, window)
        window[:, :, p % R] = x[:, :, 0]  # what append_key does after it
    assert sink[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0]  # positions 0..2, never overwritten later
    # at pos == S the slots of positions < S took position S's token; later steps left them alone
    assert window[0, 0, :6, 0].tolist() == [4.0, 4.0, 4.0, 4.0, 5.0, 6.0]
