"""Tensor-parallel generation with the quantized cache (:mod:`xquant_fx.distributed`).

In-process tests cover the per-rank geometry, the detection ``optimize`` does and the errors. The
end-to-end test runs transformers' own tensor parallelism on CPU: this file, launched by
``torchrun --standalone --nproc-per-node 2`` as a worker, loads a tiny random-weight Llama with
``DistributedConfig(tp_plan="auto")`` over a ``gloo`` process group, runs ``xquant_fx.optimize``'s
``generate`` and saves each rank's tokens and cache; the test then runs the same checkpoint
optimized in one process and compares: greedy tokens equal, each rank's cache exactly half the
bytes, and each rank's storage the head slice of the single-process storage. A last test runs
``examples/tensor_parallel.py`` the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from xquant_fx import XQuantCache, optimize
from xquant_fx.distributed import kv_tensor_parallel_size, shards_kv_heads, split_kv_heads
from xquant_fx.memory import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = "xquant-1.38"  # K2/V1 with value codes shared from layer L/2: codes, sharing and windows
PROMPT, NEW, BATCH = 150, 40, 2


def tiny_config(kv_heads: int = 4, heads: int = 8) -> LlamaConfig:
    # initializer_range 0.3: greedy logits far from ties, so float32 reduction order cannot flip a token
    return LlamaConfig(
        vocab_size=256, hidden_size=32 * heads, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=512,
        initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def prompt_ids() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, PROMPT), generator=torch.Generator().manual_seed(7))


def greedy(model):
    out = model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None)
    return out.sequences, cache if cache is not None else out.cache


# ------------------------------------------------------------------------------------ in-process
def test_cache_holds_its_share_of_the_heads():
    cfg = tiny_config()
    whole = XQuantCache(cfg, PRESET, max_batch_size=2, max_cache_len=300, device="cpu", dtype=torch.float32)
    half = XQuantCache(cfg, PRESET, max_batch_size=2, max_cache_len=300, device="cpu", dtype=torch.float32, tp_size=2)
    assert half.geometry[0] == 2 and whole.geometry[0] == 4
    assert all(t.shape[1] == 2 for layer in half.layers for t in layer.storage.values())
    assert 2 * half.allocated_bytes() == whole.allocated_bytes() > 0
    report, full = half.memory_report(), whole.memory_report()
    assert report["tp_size"] == 2 and 2 * report["bytes"] == full["bytes"] == whole.allocated_bytes()
    assert report["stored_bits"] == full["stored_bits"] and report["code_bits"] == full["code_bits"]


def test_heads_that_do_not_divide_are_refused_before_allocation():
    smol = load_config("smollm2-135m")  # 3 KV heads
    with pytest.raises(ValueError, match=r"3 KV heads, which do not divide across tp_size=2"):
        XQuantCache(smol, PRESET, max_cache_len=64, device="cpu", dtype=torch.float32, tp_size=2)
    with pytest.raises(ValueError, match="tp_size must be a positive int"):
        XQuantCache(tiny_config(), PRESET, max_cache_len=64, tp_size=0)
    assert split_kv_heads(8, 4) == 2 and split_kv_heads(3, 3) == 1


def _as_if_sharded(model, tp_size: int):
    """What transformers' from_pretrained(tp_plan=...) records on a model it shards (5.17 and 5.2x):
    the degree on ``_tp_size`` (public ``tp_size``); the resolved plan is already on ``tp_plan``."""
    model._tp_size = tp_size
    return model


def test_optimize_reads_the_tensor_parallel_degree_from_the_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    assert kv_tensor_parallel_size(model) == 1
    assert shards_kv_heads(model.tp_plan)  # Llama's predefined plan shards k_proj column-wise
    assert kv_tensor_parallel_size(_as_if_sharded(model, 2)) == 2
    assert not shards_kv_heads({"model.layers.*.self_attn.k_proj": "colwise_rep", "lm_head": "colwise"})
    model.tp_plan = {"model.layers.*.mlp.up_proj": "colwise"}  # heads left whole on every rank
    assert kv_tensor_parallel_size(model) == 1

    # SmolLM2's attention shape over 2 ranks: refused by optimize itself, naming heads and ranks
    smol = _as_if_sharded(LlamaForCausalLM(tiny_config(kv_heads=3, heads=9)).eval(), 2)
    with pytest.raises(ValueError, match=r"has 3 KV heads, which do not divide across tp_size=2"):
        optimize(smol, PRESET)


def test_a_cache_whose_heads_disagree_with_the_activations_says_why():
    # optimize() on a model that claims 2 ranks but whose attention still computes all 4 heads
    torch.manual_seed(0)
    model = optimize(_as_if_sharded(LlamaForCausalLM(tiny_config()).eval(), 2), PRESET)
    with pytest.raises(ValueError, match=r"carry 4 KV heads but the cache expects 2 per rank"):
        model.generate(prompt_ids()[:, :8], max_new_tokens=2)
    # a cache built without tp_size for a model transformers sharded (its config records it)
    cfg = tiny_config()
    cfg.distributed_config = {"tp_size": 2}
    cache = XQuantCache(cfg, PRESET, max_cache_len=64)
    k = torch.zeros(1, 2, 4, 32)
    with pytest.raises(ValueError, match=r"tp_size=model.tp_size"):
        cache.update(k, k, 0)
    assert not any(layer.is_initialized for layer in cache.layers)


# ------------------------------------------------------------------------------------ two processes
def worker(out: Path) -> None:
    """One rank of ``torchrun --nproc-per-node 2 tests/test_tensor_parallel.py OUT``."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_config()).save_pretrained(out / "model")
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_config(kv_heads=3, heads=9)).save_pretrained(out / "model3")
    dist.barrier()

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    distributed_config=DistributedConfig(tp_plan="auto")).eval()

    model = optimize(load(out / "model"), PRESET)
    tokens, cache = greedy(model)
    try:
        optimize(load(out / "model3"), PRESET)
        refused = None
    except ValueError as err:
        refused = str(err)
    torch.save(
        dict(
            tp_size=model.tp_size, cache_tp_size=cache.tp_size, tokens=tokens, bytes=cache.allocated_bytes(),
            report=cache.memory_report(), refused=refused,
            storage=[{k: t.clone() for k, t in layer.storage.items()} for layer in cache.layers],
        ),
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_gloo_tensor_parallel_matches_one_process(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' from_pretrained(tp_plan=...) needs accelerate")
    # CPU and gloo even on a GPU machine: transformers picks the TP device from the visible accelerator
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    single_model = optimize(LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval(), PRESET)
    tokens, cache = greedy(single_model)
    assert cache.tp_size == 1
    heads = cache.geometry[0] // 2
    for r, got in enumerate(ranks):
        assert got["tp_size"] == 2 and got["cache_tp_size"] == 2
        assert torch.equal(got["tokens"], tokens), f"rank {r}: greedy tokens differ from the single process"
        assert 2 * got["bytes"] == cache.allocated_bytes() > 0
        assert 2 * got["report"]["bytes"] == cache.memory_report()["bytes"]
        assert got["refused"] is not None and "3 KV heads" in got["refused"] and "world size 2" in got["refused"]
        # each rank holds the head slice [r*H/2, (r+1)*H/2) of the single-process storage
        for i, (mine, whole) in enumerate(zip(got["storage"], (layer.storage for layer in cache.layers))):
            assert mine.keys() == whole.keys()
            for name, t in mine.items():
                ref = whole[name][:, r * heads : (r + 1) * heads]
                assert t.shape == ref.shape, (i, name)
                if t.dtype == torch.int32:  # packed codes: a float32 rounding difference may flip a code
                    assert (t == ref).float().mean() > 0.999, (i, name)
                else:
                    torch.testing.assert_close(t, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"layer {i} {name}: {m}")


def test_example_generates_on_two_cpu_processes(tmp_path):
    """``examples/tensor_parallel.py --device cpu``: a random-weight Llama sharded over two gloo
    ranks, optimized and generating; each rank reports its half of the KV heads."""
    pytest.importorskip("accelerate", reason="transformers' tensor parallelism needs accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "tensor_parallel.py"), "--device", "cpu", "--new", "5"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = re.findall(r"rank (\d)/2: 2 of the 4 KV heads per layer, cache ([\d,]+) bytes", proc.stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"], proc.stdout
    assert ranks[0][1] == ranks[1][1]  # the same share on both ranks
    generated = re.search(r"^generated: \[([\d, ]+)\]$", proc.stdout, re.M)
    assert generated and len(generated.group(1).split(",")) == 5, proc.stdout


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
