"""Graph passes on real transformers decode graphs (Dynamo FX), and the ``xquant`` backend."""

import operator

import pytest
import torch
import torch.fx as fx

from mini_models import FAMILIES, mini_model
from xquant_fx import XQuantCache
from xquant_fx.api import cache_argument
from xquant_fx.passes import PassReport, run_passes
from xquant_fx.passes.fuse_kv_attention import fuse_kv_attention


def capture(model, cache, ids, position):
    """Dynamo graph of one decode step; returns (graph module, example call kwargs)."""
    graphs = []

    def backend(gm, inputs, **_):
        graphs.append(gm)
        return gm.forward

    kwargs = {cache_argument(model): cache, "position_ids": torch.tensor([[position]])}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.forward, backend=backend, fullgraph=True)(ids, **kwargs)
    assert len(graphs) == 1
    return graphs[0]


def prefilled(model, preset="kivi-2", prompt=150, length=200, seed=0):
    ids = torch.randint(1, 128, (1, prompt + 8), generator=torch.Generator().manual_seed(seed))
    cache = XQuantCache(model.config, preset, max_cache_len=length, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(ids[:, :prompt], **{cache_argument(model): cache})
    return ids, cache


def count(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def assert_steps_match(model, ids, cache, ref_cache, steps, report):
    """Decode ``steps`` tokens from position 150 through the forward compiled with the passes
    only (no Inductor) on ``cache`` and eagerly on ``ref_cache``: the logits agree at each step."""
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=lambda g, i, **_: run_passes(g, report).forward, fullgraph=True)
    arg = cache_argument(model)
    with torch.no_grad():
        for t in range(150, 150 + steps):
            position = torch.tensor([[t]])
            want = model(ids[:, t : t + 1], position_ids=position, **{arg: ref_cache}).logits
            got = step(ids[:, t : t + 1], position_ids=position, **{arg: cache}).logits
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), t


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuse_fires_per_quantized_layer_and_keeps_outputs(family):
    model = mini_model(family, num_hidden_layers=2 if family not in ("gemma2", "gemma3") else 4)
    ids, cache = prefilled(model)
    quantized = sum(1 for p in cache.plans if not p.sliding)
    gm = capture(model, cache, ids[:, 150:151], 150)
    assert count(gm, "read_keys") == quantized
    if family == "gemma2":
        # Gemma 2 soft-caps its attention logits, so transformers runs eager attention (no SDPA)
        # and the pass must decline: the fused kernel has no soft-capping.
        assert count(gm, "scaled_dot_product_attention") == 0 and fuse_kv_attention(gm) == 0
        return
    assert count(gm, "scaled_dot_product_attention") == len(cache.plans)
    hits = fuse_kv_attention(gm)
    gm.recompile()
    assert hits == quantized
    assert count(gm, "xquant.attend") == quantized and count(gm, "read_keys") == 0 and count(gm, "read_values") == 0
    assert count(gm, "scaled_dot_product_attention") == len(cache.plans) - quantized
    for node in gm.graph.nodes:
        if "xquant.attend" in str(node.target):
            layer = int(str(node.args[1].args[0]).split("layers_")[1].split("_")[0])
            assert f"layers_{layer}_k_codes" in str(node.args[1].args[0])  # its own layer's codes
            assert f"layers_{layer}_v_window" in str(node.args[8].args[0])
            assert node.args[-1] is not None  # the attention mask is carried
    assert fuse_kv_attention(gm) == 0  # idempotent


def test_fused_graph_matches_eager_step_by_step():
    """The rewritten graph, run as it is (no Inductor), gives the eager logits at every step."""
    model = mini_model("qwen3", num_hidden_layers=2)
    ids, cache = prefilled(model, "xquant-1.38")
    _, ref_cache = prefilled(model, "xquant-1.38")
    report = PassReport()
    assert_steps_match(model, ids, cache, ref_cache, 8, report)
    assert report.hits == {"fuse_kv_attention": 2, "inline_rotations": 0, "prune_moe_router": 0,
                           "router_topk": 0} and report.graphs == 1


def test_declines_without_quantized_cache():
    model = mini_model("llama", num_hidden_layers=2)
    ids, cache = prefilled(model, "fp16")
    gm = capture(model, cache, ids[:, 150:151], 150)
    assert fuse_kv_attention(gm) == 0
    assert count(gm, "scaled_dot_product_attention") == 2


def test_declines_on_prefill_and_on_a_head_reordering_view():
    model = mini_model("llama", num_hidden_layers=1)
    ids, cache = prefilled(model, prompt=100)
    gm = capture(model, cache, ids[:, 100:120], 100)  # 20 query rows: a chunk of prefill
    assert fuse_kv_attention(gm) == 0
    ids, cache = prefilled(model)
    gm = capture(model, cache, ids[:, 150:151], 150)
    # put the repeat axis in front of the heads: same shapes, different head -> KV-head map
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple) \
                and len(node.args[1]) == 5 and node.args[1][2] is None:
            node.args = (node.args[0], (slice(None), None, slice(None), slice(None), slice(None)))
    assert fuse_kv_attention(gm) == 0


def test_declines_a_value_read_whose_group_is_not_its_storages():
    """``attend`` reads the value group from the value storage; a read that names another group
    (one the storage's shape contradicts) is left unfused rather than given another meaning."""
    model = mini_model("llama", num_hidden_layers=1)
    ids, cache = prefilled(model, "kivi-2:value_group_size=64")
    gm = capture(model, cache, ids[:, 150:151], 150)
    reads = [n for n in gm.graph.nodes if "xquant.read_values" in str(n.target)]
    assert len(reads) == 1 and reads[0].args[6] == 64
    reads[0].args = (*reads[0].args[:6], 32, *reads[0].args[7:])
    assert fuse_kv_attention(gm) == 0
    reads[0].args = (*reads[0].args[:6], 64, *reads[0].args[7:])
    assert fuse_kv_attention(gm) == 1


@pytest.mark.parametrize("spec,kernels", [("xquant-1.38:rotation=hadamard", False), ("kivi-2:sink_tokens=4", False),
                                          ("xquant-1.38:sink_tokens=3,rotation=hadamard", False),
                                          ("xquant-1.38:sink_tokens=3,rotation=hadamard", True),
                                          ("kivi-2:value_group_size=64,sink_tokens=4", True),
                                          ("xquant-1.38:level_fit=lsq,eta=none", True)])
def test_quality_options_fuse_and_keep_outputs(spec, kernels, monkeypatch):
    """A rotating cache fuses: the query is rotated before attend and the output after it (the
    reads' own rotations are gone). A cache with sink tokens fuses with its sink buffers passed to
    attend. Either way the graph gives the eager logits step by step; ``kernels``: the fused
    graph's ops run the Triton kernels (interpreter) instead of their reference."""
    rotated, sinks = "rotation" in spec, "sink_tokens" in spec
    model = mini_model("llama", num_hidden_layers=2)
    ids, captured = prefilled(model, spec)
    gm = capture(model, captured, ids[:, 150:151], 150)  # runs a step: the comparison below takes fresh caches
    # per layer: the new key and value rotated for storing, the two reads rotated back
    assert count(gm, "xquant.hadamard") == (8 if rotated else 0)
    hits = fuse_kv_attention(gm)
    gm.recompile()
    assert hits == 2
    attends = [n for n in gm.graph.nodes if "xquant.attend" in str(n.target)]
    assert len(attends) == 2 and count(gm, "read_keys") == 0 and count(gm, "scaled_dot_product_attention") == 0
    for node in attends:
        assert len(node.args) == (17 if sinks else 15)  # k_sink, v_sink after the mask
        if rotated:
            assert "xquant.hadamard" in str(node.args[0].target)  # rotated query
            assert [str(u.target) for u in node.users] == ["xquant.hadamard.default"]  # rotated output
    assert count(gm, "xquant.hadamard") == (8 if rotated else 0)  # the reads' two became the query's and the output's
    _, cache = prefilled(model, spec)
    _, ref_cache = prefilled(model, spec)
    if kernels:
        monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
    report = PassReport()
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=lambda g, i, **_: run_passes(g, report).forward, fullgraph=True)
    arg = cache_argument(model)
    with torch.no_grad():
        for t in range(150, 156):
            position = torch.tensor([[t]])
            got = step(ids[:, t : t + 1], position_ids=position, **{arg: cache}).logits
            monkeypatch.delenv("XQUANT_FORCE_KERNELS", raising=False)  # the eager reference
            want = model(ids[:, t : t + 1], position_ids=position, **{arg: ref_cache}).logits
            if kernels:
                monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), t
    assert report.hits["fuse_kv_attention"] == 2


def test_folded_value_rotation_leaves_only_the_query_rotated():
    """With the value rotation folded into the weights (``xquant_fx.rotation``) the cache stores
    values as they come: per layer, the new key's rotation and the query's remain, the output is
    attend's own; the fused graph still gives the eager logits."""
    from xquant_fx.rotation import fold_value_rotation

    model = mini_model("llama", num_hidden_layers=2)
    assert fold_value_rotation(model) == 2
    spec = "xquant-1.38:rotation=hadamard"
    ids, captured = prefilled(model, spec)
    gm = capture(model, captured, ids[:, 150:151], 150)
    assert count(gm, "xquant.hadamard") == 4  # per layer: the new key, the key read
    assert fuse_kv_attention(gm) == 2
    gm.recompile()
    for node in gm.graph.nodes:
        if "xquant.attend" in str(node.target):
            assert "xquant.hadamard" in str(node.args[0].target)
            assert all("hadamard" not in str(u.target) for u in node.users)
    assert count(gm, "xquant.hadamard") == 4  # the new key's and the query's
    _, cache = prefilled(model, spec)
    _, ref_cache = prefilled(model, spec)
    report = PassReport()
    assert_steps_match(model, ids, cache, ref_cache, 4, report)
    assert report.hits["fuse_kv_attention"] == 2
