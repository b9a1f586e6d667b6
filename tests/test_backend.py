"""The ``xquant`` backend end to end: optimize(), torch.compile(backend="xquant"), same tokens."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mini_models import mini_model
from xquant_fx import XQuantCache, optimize, smollm2
from xquant_fx.api import cache_argument
from xquant_fx.backend import REPORT
from xquant_fx.cli.demo import QUESTION


def test_backend_is_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    from xquant_fx.backend import xquant

    assert lookup_backend("xquant") is xquant


def test_torch_compile_backend_decode_matches_eager():
    """torch.compile(forward, backend="xquant") over decode steps: same tokens as eager."""
    model = mini_model("mistral", num_hidden_layers=2)
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    arg = cache_argument(model)

    def decode(step, steps=12):
        cache = XQuantCache(model.config, "xquant-1.38", max_cache_len=170)
        with torch.no_grad():
            token = model(ids, **{arg: cache}).logits[:, -1:].argmax(-1)
            tokens = [token]
            for i in range(steps):
                token = step(token, position_ids=torch.tensor([[150 + i]]), **{arg: cache}).logits[:, -1:].argmax(-1)
                tokens.append(token)
        return torch.cat(tokens, 1)

    before = REPORT.hits.get("fuse_kv_attention", 0)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="xquant", mode="max-autotune-no-cudagraphs", fullgraph=True)
    assert torch.equal(decode(compiled), decode(model.forward))
    assert REPORT.hits["fuse_kv_attention"] - before == 2


@pytest.fixture(scope="module")
def smol():
    return smollm2.load(torch.float32)


def test_optimize_real_model_same_tokens_as_eager_cache(smol):
    """Eager XQuantCache and the compiled optimize() give the same greedy tokens on SmolLM2."""
    model, tokenizer = smol
    ids = smollm2.chat_ids(tokenizer, QUESTION)
    eager = model.generate(ids, max_new_tokens=12, do_sample=False,
                           **{cache_argument(model): XQuantCache(model.config, "xquant-1.38", max_cache_len=ids.shape[1] + 12)})
    before = REPORT.hits.get("fuse_kv_attention", 0)
    torch._dynamo.reset()
    optimize(model, "xquant-1.38", compile=True)
    assert model.generation_config.compile_config.backend == "xquant"
    compiled = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(compiled, eager)
    assert REPORT.hits["fuse_kv_attention"] - before == 30  # every layer's attention fused


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_optimize_same_tokens_as_eager_cache_per_family(family):
    """Eager XQuantCache generate and optimize()'s compiled decode step agree on each family
    (Mistral: test_torch_compile_backend_decode_matches_eager above, through the backend directly; every
    family's rewritten graph is checked against eager in test_passes.py, without Inductor)."""
    model = mini_model(family, num_hidden_layers=2 if family not in ("gemma2", "gemma3") else 4)
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(1))
    cache = XQuantCache(model.config, "xquant-1.38", max_cache_len=160)
    eager = model.generate(ids, max_new_tokens=8, do_sample=False, **{cache_argument(model): cache})
    torch._dynamo.reset()
    optimize(model, "xquant-1.38", compile=True)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), eager)
    torch._dynamo.reset()


def test_optimize_fp8_metadata_same_tokens_and_logits_as_eager_cache():
    """A float8-metadata config (scales and zero points stored as float8_e4m3fn) through optimize():
    the compiled decode step gives the eager XQuantCache's greedy tokens and logits."""
    from xquant_fx import XQuantConfig

    xq = XQuantConfig.from_spec("kivi-2:metadata_dtype=float8_e4m3fn,residual_length=32")
    model = mini_model("llama", num_hidden_layers=2)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    steps = dict(max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cache = XQuantCache(model.config, xq, max_cache_len=80)
    eager = model.generate(ids, **steps, **{cache_argument(model): cache})
    assert cache.layers[0].k_scale.dtype == torch.float8_e4m3fn
    torch._dynamo.reset()
    optimize(model, xq.name, compile=True)  # the spec string, as a user would write it
    compiled = model.generate(ids, **steps)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_source_hash_follows_every_source_file(tmp_path):
    from xquant_fx.backend import source_hash

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = source_hash(tmp_path)
    assert source_hash(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert source_hash(tmp_path) != first
    (tmp_path / "notes.txt").write_text("not source")
    assert len({first, source_hash(tmp_path)}) == 2


def test_backend_keys_inductor_caches_to_the_sources(monkeypatch):
    """The backend hands Inductor the source stamp, and a stamp is what keeps Inductor's on-disk
    cache from serving a graph compiled against an older body of a custom op (checked below in two
    processes sharing one cache directory: the second, with a changed op body, must see it)."""
    import torch._inductor.compile_fx as inductor

    from xquant_fx import backend

    seen = {}
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches: seen.update(config_patches) or gm)
    backend.xquant(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [torch.randn(1, 2)])
    assert seen["post_grad_custom_pre_pass"].uuid() == backend.source_hash(Path(backend.__file__).parent)


def test_source_stamp_defeats_a_stale_inductor_cache(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import stale_op
        from pathlib import Path
        from torch._inductor.compile_fx import compile_fx
        from xquant_fx.backend import source_hash, stamp_pass

        stamp = stamp_pass(source_hash(Path(sys.argv[1])))
        f = torch.compile(lambda x: torch.ops.stale_test.f(x) * 3,
                          backend=lambda gm, inputs: compile_fx(gm, inputs, config_patches={"post_grad_custom_pre_pass": stamp}))
        print(f(torch.ones(2)).tolist())
    """)
    op = textwrap.dedent("""
        import torch
        from torch.library import triton_op

        @triton_op("stale_test::f", mutates_args=())
        def f(x: torch.Tensor) -> torch.Tensor:
            return x + {add}
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    src = tmp_path / "src"  # apart from the cache directory, whose generated files are sources too
    src.mkdir()
    results = []
    for add in (1, 2):
        (src / "stale_op.py").write_text(op.format(add=add))
        out = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results.append(out.stdout.strip().splitlines()[-1])
    assert results == ["[6.0, 6.0]", "[9.0, 9.0]"]


def test_kernel_analysis_is_memoized_per_signature(monkeypatch):
    """Inductor's per-launch TTIR analysis runs once per (kernel, argument signature) for this
    package's kernels, and untouched for anyone else's."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    from xquant_fx import backend
    from xquant_fx.kernels.append import _append_token_kernel

    name = next(n for n in backend._ANALYSES if hasattr(wrap, n))
    calls = []
    monkeypatch.setattr(wrap, name, lambda kernel, kwargs, *rest: calls.append(kernel) or ["out"])
    monkeypatch.setattr(backend, "_KERNEL_ACCESSES", {})

    class Foreign:
        fn = None

    ours = {"x": torch.empty(2, dtype=torch.bfloat16), "n": 4, "BLOCK": 16}
    before = getattr(wrap, name)
    with backend.memoized_kernel_analysis():
        for _ in range(3):
            assert getattr(wrap, name)(_append_token_kernel, dict(ours), {}) == ["out"]
        getattr(wrap, name)(_append_token_kernel, {**ours, "n": 1}, {})   # another int: another TTIR
        getattr(wrap, name)(_append_token_kernel, {**ours, "x": torch.empty(2)}, {})  # another dtype
        getattr(wrap, name)(Foreign(), dict(ours), {})
        getattr(wrap, name)(Foreign(), dict(ours), {})
    assert len(calls) == 5
    assert getattr(wrap, name) is before  # restored after the block
    assert backend._analysis_key(Foreign(), ours, {}) is None


@pytest.mark.parametrize("mode, options, whole", [
    (None, {}, False),
    ("reduce-overhead", {}, True),
    (None, {"triton.cudagraphs": True}, True),
    ("reduce-overhead", {"xquant_inline_kernels": True}, False),
    (None, {"xquant_inline_kernels": False}, True),
])
def test_ops_stay_whole_under_cuda_graphs_unless_told(monkeypatch, mode, options, whole):
    """With CUDA graphs the backend keeps each ``triton_op`` one call (no trace of its launch
    code); otherwise, or when told, Inductor traces into it."""
    import torch._inductor.compile_fx as compile_fx_module

    from xquant_fx.backend import xquant

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append((torch._functorch.config.decompose_custom_triton_ops, dict(config_patches)))
        return gm

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    xquant(gm, [torch.randn(1, 2)], mode=mode, options=dict(options))
    assert seen[0][0] is (not whole)
    assert "xquant_inline_kernels" not in seen[0][1]  # the backend's own option is not Inductor's
    assert torch._functorch.config.decompose_custom_triton_ops  # restored


def test_whole_ops_are_reinplaced_on_the_cache_and_match_eager(monkeypatch):
    """The kernel path (interpreter) compiled with the ops whole: each layer's write is one
    ``append_token`` call on the cache's own buffers (no copy of them in the generated code), each
    attention one ``attend`` call, the rotations of a rotating cache compiled code rather than
    ``xquant::hadamard`` calls, and the tokens equal eager decoding through the same ops."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")
    model = mini_model("llama", num_hidden_layers=2)
    ids = torch.randint(1, 128, (2, 170), generator=torch.Generator().manual_seed(1))
    arg = cache_argument(model)

    def decode(step, steps=3):
        cache = XQuantCache(model.config, "kivi-2:rotation=hadamard", max_cache_len=176,
                            max_batch_size=2)  # > the 128-token window
        with torch.no_grad():
            token = model(ids, **{arg: cache}).logits[:, -1:].argmax(-1)
            codes = cache.layers[0].storage["k_codes"]  # allocated by the first write
            tokens = [token]
            for i in range(steps):
                pos = torch.tensor([[170 + i]]).expand(2, 1)
                token = step(token, position_ids=pos, **{arg: cache}).logits[:, -1:].argmax(-1)
                tokens.append(token)
        assert cache.layers[0].storage["k_codes"] is codes
        return torch.cat(tokens, 1)

    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="xquant", options={"xquant_inline_kernels": False},
                             fullgraph=True)
    got, codes = run_and_get_code(decode, compiled)
    assert torch.equal(got, decode(model.forward))
    code = "\n".join(codes)
    assert code.count("torch.ops.xquant.append_token.default(") == 2
    assert code.count("torch.ops.xquant.attend.default(") == 2
    assert "xquant.hadamard" not in code  # inline_rotations: Inductor compiled them
    assert ".clone()" not in code and "aten.copy_" not in code
