"""MoE options of the config and their resolution per MoE layer."""

from __future__ import annotations

import pytest

from xquant_fx import XQuantConfig
from xquant_fx.config import MoESchedule


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field, value",
    [
        ("moe_top_k", 0), ("moe_top_k", -2), ("moe_top_k", "4"), ("moe_top_k", []), ("moe_top_k", [2, 0]),
        ("moe_top_k", 2.0), ("moe_top_k", MoESchedule(0, 2, 2, 1)), ("moe_top_k", MoESchedule(2, 2, 2, -1)),
        ("moe_renormalize", "yes"), ("moe_min_weight", 1.0), ("moe_min_weight", -0.1),
        ("moe_top_p", 0.0), ("moe_top_p", 1.5), ("moe_top_p", True),
    ],
)
def test_bad_moe_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        XQuantConfig(**{field: value})


def test_schedule_interpolates_over_moe_layers_and_rounds_halves_up():
    assert MoESchedule(2, 6, 3, 2).resolve(6) == [2, 4, 6, 5, 4, 3]
    assert MoESchedule(1, 2, 1, 2).resolve(5) == [1, 2, 2, 2, 1]  # 1.5 -> 2 on both sides
    assert MoESchedule(4, 4, 1, 0).resolve(4) == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="at=6"):
        MoESchedule(2, 6, 3, 6).resolve(6)


def test_resolve_top_k_checks_the_model():
    assert XQuantConfig(moe_top_k=3).resolve_moe_top_k(4, 8) == [3] * 4
    assert XQuantConfig(moe_top_k=[1, 2, 3]).resolve_moe_top_k(3, 4) == [1, 2, 3]
    assert XQuantConfig().resolve_moe_top_k(2, 6) == [6, 6]
    with pytest.raises(ValueError, match="routes each token to 4"):
        XQuantConfig(moe_top_k=5).resolve_moe_top_k(3, 4)
    with pytest.raises(ValueError, match="lists 2 MoE layers but the model has 3"):
        XQuantConfig(moe_top_k=[1, 2]).resolve_moe_top_k(3, 4)
