"""The ``inline_rotations`` pass: no ``xquant::hadamard`` call survives the pipeline, and the
decode graph still gives the eager logits."""

import torch

from mini_models import mini_model
from test_fuse_kv_attention import assert_steps_match, capture, count, prefilled
from xquant_fx import quant
from xquant_fx.passes import PassReport
from xquant_fx.passes.fuse_kv_attention import fuse_kv_attention
from xquant_fx.passes.inline_rotations import inline_rotations


def test_rotations_become_plain_torch_after_the_fusion():
    """Per layer of a rotating cache the fused graph rotates the new key and value (for storing),
    the query and the output; all four become :func:`quant.hadamard_butterfly` calls, with the same
    results."""
    model = mini_model("llama", num_hidden_layers=2)
    spec = "xquant-1.38:sink_tokens=3,rotation=hadamard"
    ids, captured = prefilled(model, spec)
    gm = capture(model, captured, ids[:, 150:151], 150)
    assert fuse_kv_attention(gm) == 2
    assert count(gm, "xquant.hadamard") == 8
    assert inline_rotations(gm) == 8
    gm.recompile()
    assert count(gm, "xquant.hadamard") == 0
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is quant.hadamard_butterfly) == 8
    assert inline_rotations(gm) == 0  # nothing left
    _, cache = prefilled(model, spec)
    _, ref_cache = prefilled(model, spec)
    report = PassReport()
    assert_steps_match(model, ids, cache, ref_cache, 4, report)  # the whole pipeline, against eager
    assert report.hits["inline_rotations"] == 8 and report.hits["fuse_kv_attention"] == 2


def test_a_graph_without_rotations_is_left_alone():
    model = mini_model("llama", num_hidden_layers=1)
    ids, captured = prefilled(model, "kivi-2")
    gm = capture(model, captured, ids[:, 150:151], 150)
    before = [str(n.target) for n in gm.graph.nodes]
    assert inline_rotations(gm) == 0
    assert [str(n.target) for n in gm.graph.nodes] == before
