"""XQuantConfig refuses bad values at the call that takes them, with a ValueError naming the field."""

import pytest

from xquant_fx import XQuantConfig
from xquant_fx.config import MoESchedule


@pytest.mark.parametrize(
    "kwargs,match",
    [
        # A float bit width used to fail deep inside with "'float' object is not iterable".
        (dict(k_bits=2.0), r"XQuantConfig\.k_bits=2\.0: must be an int"),
        (dict(v_bits=1.0), r"XQuantConfig\.v_bits=1\.0: must be an int"),
        (dict(k_bits=None), r"XQuantConfig\.k_bits=None: must be an int"),
        (dict(k_bits="2"), r"XQuantConfig\.k_bits='2': must be an int"),
        (dict(k_bits=[]), r"XQuantConfig\.k_bits=\[\]"),
        (dict(v_bits=[2, 2.0]), r"XQuantConfig\.v_bits=\[2, 2\.0\]: entry 1 is 2\.0"),
        # True == 1: a bool used to be taken as a 1-bit cache.
        (dict(k_bits=True), r"XQuantConfig\.k_bits=True"),
        (dict(v_bits=[2, False]), r"entry 1 is False"),
        (dict(group_size=32.0), r"XQuantConfig\.group_size=32\.0"),
        (dict(group_size=True), r"XQuantConfig\.group_size=True"),
        (dict(residual_length=128.0), r"XQuantConfig\.residual_length=128\.0"),
        (dict(k_share_from=True), r"XQuantConfig\.k_share_from=True"),
        (dict(v_share_from=float("nan")), r"XQuantConfig\.v_share_from=nan"),
        (dict(eta={2.0: 0.09}), r"eta has key 2\.0"),
        (dict(eta={True: 0.1}), r"eta has key True"),
        (dict(eta={2: False}), r"eta\[2\]=False"),
        (dict(name=None), r"XQuantConfig\.name=None"),
        (dict(moe_top_k=True), r"XQuantConfig\.moe_top_k=True"),
        (dict(moe_top_k=[2, True]), r"XQuantConfig\.moe_top_k"),
        (dict(moe_top_k=MoESchedule(2, 8, 4, True)), r"XQuantConfig\.moe_top_k"),
    ],
)
def test_bad_field_values_raise_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XQuantConfig(**kwargs)


def test_good_values_still_accepted():
    xq = XQuantConfig(k_bits=[2, 2, 4, 16], v_bits=(1, 1, 2, 2), group_size=64, residual_length=128,
                      k_share_from=0, v_share_from=0.5, eta={1: 1 / 6, 2: 0})
    assert xq.k_bits == (2, 2, 4, 16) and xq.v_bits == (1, 1, 2, 2)
    assert XQuantConfig(k_bits=1).k_bits == 1
    for name in XQuantConfig.PRESETS:
        assert XQuantConfig.preset(name).name == name


def test_share_start_past_the_last_layer_is_refused_at_resolve():
    xq = XQuantConfig(k_bits=2, v_bits=1, v_share_from=100)  # fine before the depth is known
    with pytest.raises(ValueError, match=r"v_share_from=100: the model has 30 layers \(0\.\.29\)"):
        xq.resolve(30)
    with pytest.raises(ValueError, match=r"k_share_from=30: the model has 30 layers"):
        XQuantConfig(k_share_from=30).resolve(30)
    with pytest.raises(ValueError, match="v_share_from=100"):
        xq.code_bits(30)
    # The last layer index is accepted and shares that layer (29 is odd); a fraction fits any depth.
    plans = XQuantConfig(v_share_from=29).resolve(30)
    assert [p.index for p in plans if p.v_shares] == [29]
    assert [p.index for p in XQuantConfig(v_share_from=1.0).resolve(30) if p.v_shares] == []
    for layers in (1, 2, 3, 30):
        for name in XQuantConfig.PRESETS:
            XQuantConfig.preset(name).resolve(layers)


@pytest.mark.parametrize("layers", [0, -3, 2.0, None])
def test_resolve_needs_a_positive_layer_count(layers):
    # 0 layers used to reach a ZeroDivisionError in code_bits / memory_report.
    with pytest.raises(ValueError, match=rf"num_layers={layers!r}"):
        XQuantConfig.preset("kivi-2").resolve(layers)
    with pytest.raises(ValueError, match="num_layers"):
        XQuantConfig.preset("kivi-2").code_bits(layers)


def test_resolve_checks_sliding_flags_length():
    with pytest.raises(ValueError, match="3 sliding flags for 4 layers"):
        XQuantConfig().resolve(4, [False] * 3)


def test_spec_errors_name_the_spec():
    with pytest.raises(ValueError, match=r"config spec 'kivi-2:k_bits=2\.0': k_bits='2\.0' is not an int"):
        XQuantConfig.from_spec("kivi-2:k_bits=2.0")
    # The depth check applies to specs too, once a model's depth is known.
    with pytest.raises(ValueError, match="v_share_from=64: the model has 30 layers"):
        XQuantConfig.from_spec("kivi-2:v_share_from=64").resolve(30)
