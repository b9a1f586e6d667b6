"""The token comparison of ``benchmarks/check_export_cuda.py``: two paths' greedy tokens agree when
equal, or when they part at a step where the eager reference's top-2 logits tie (at most
``TIE_SPACINGS`` spacings of the model dtype apart) after the same prefix; any other difference
fails. Plus the ``--tokens-only`` dry run on CPU."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import check_export_cuda as cec  # noqa: E402

REF = [5, 6, 7, 8, 9]
ONE = 2.0**-7  # bf16's spacing at 1


def margins(tie_at=None, gap=0.0):
    return [(gap if i == tie_at else 10 * ONE, ONE) for i in range(len(REF))]


def test_equal_tokens_agree():
    assert cec.tokens_agree(REF, list(REF), REF, margins()) == (True, "equal")


def test_a_difference_at_a_tie_agrees_and_says_so():
    ok, detail = cec.tokens_agree([5, 6, 1, 2, 3], REF, REF, margins(tie_at=2))
    assert ok and detail.startswith("equal up to a tie: first difference at new token 2")
    ok, _ = cec.tokens_agree([5, 6, 1, 2, 3], REF, REF, margins(tie_at=2, gap=ONE))  # one spacing
    assert ok


def test_a_difference_without_a_tie_fails():
    ok, detail = cec.tokens_agree([5, 6, 1, 2, 3], REF, REF, margins(tie_at=2, gap=2 * ONE))
    assert not ok and "first difference at new token 2" in detail and "2.0 x" in detail
    ok, _ = cec.tokens_agree([5, 6, 1, 2, 3], REF, REF, margins(tie_at=3))  # the tie is elsewhere
    assert not ok


def test_a_tie_after_another_prefix_does_not_count():
    """The reference's margin says nothing about a context the reference never saw."""
    other = [5, 0, 7, 8, 9]  # the reference parted earlier
    ok, _ = cec.tokens_agree([5, 6, 1, 2, 3], [5, 6, 7, 8, 9], other, margins(tie_at=2))
    assert not ok


def test_top2_margin_in_spacings():
    gap, spacing = cec.top2_margin(torch.tensor([0.0, 3.0, 3.0 - 2 * 2.0**-6]), torch.bfloat16)
    assert spacing == 2.0**-6 and abs(gap / spacing - 2.0) < 1e-6  # 3 is in [2, 4): spacing 2^-6


def test_tokens_only_dry_run(tmp_path):
    assert cec.main(["--device", "cpu", "--shapes", "mini", "--dtype", "float32", "--tokens-only",
                     "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "export_cuda.json").read_text())
    assert report["passed"] and not list((tmp_path / "work").glob("*.pt2"))  # nothing exported
    assert [name for name, ok, _ in report["checks"]] == [
        "mini: optimize() greedy tokens equal the eager XQuantCache's (or part where its top-2 logits tie)"]
    assert set(report["tokens"]["mini"]) >= {"eager XQuantCache", "optimize()", "eager top-2 margins"}
