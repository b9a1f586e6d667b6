"""Tensor-parallel generation with the quantized KV cache.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model meta-llama/Llama-3.1-8B-Instruct
    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cpu

transformers shards the model over the ranks itself (``DistributedConfig(tp_plan="auto")``, or the
older ``from_pretrained(..., tp_plan="auto")``); ``xquant_fx.optimize`` takes the sharded model as
it is: each rank's cache holds that rank's share of the KV heads, quantized locally, with no
communication beyond the model's own all-reduces. The KV heads must divide across the ranks.

Without ``--model`` every rank builds the same small random-weight Llama (nothing is downloaded)
and the prompt is random tokens. Parity with one device, per-rank memory and speed are measured by
``benchmarks/bench_tensor_parallel.py``. transformers' tensor parallelism needs ``accelerate``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import xquant_fx  # noqa: E402


def random_llama(path: Path) -> None:
    """A small Llama (8 query / 4 KV heads) with random weights, the same on every rank (seed 0)."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, initializer_range=0.3, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )).save_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory or hub id (default: a small random-weight Llama)")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="cpu: shard on the CPU (gloo) even where GPUs are visible")
    p.add_argument("--preset", default="xquant-1.38")
    p.add_argument("--new", type=int, default=8, help="tokens to generate")
    args = p.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        sys.exit("launch with torchrun on 2 or more processes: torchrun --nproc-per-node 2 examples/tensor_parallel.py")
    if args.device == "cpu":  # transformers shards onto the machine's accelerator: hide it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or Path(tmp) / "random-llama"
        if args.model is None:
            random_llama(path)
        # transformers creates the process group (NCCL on GPUs, gloo on CPU) and loads each
        # rank's shard of every weight onto that rank's device.
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", distributed_config=DistributedConfig(tp_plan="auto")
        ).eval()
    rank = dist.get_rank()
    model = xquant_fx.optimize(model, args.preset)  # reads the split from model.tp_size / model.tp_plan

    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids = tokenizer("Tensor parallelism splits a model", return_tensors="pt").input_ids
    else:
        tokenizer, ids = None, torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    # every rank runs generate on the same input_ids; each gets the whole output
    out = model.generate(ids.to(model.device), max_new_tokens=args.new, do_sample=False,
                         return_dict_in_generate=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values  # older transformers
    mine = (f"rank {rank}/{model.tp_size}: {cache.geometry[0]} of the {model.config.num_key_value_heads} KV heads "
            f"per layer, cache {cache.allocated_bytes():,} bytes")
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, mine)  # rank 0 prints for all
    if rank == 0:
        new = out.sequences[0, ids.shape[1]:]
        print(*lines, f"generated: {tokenizer.decode(new) if tokenizer else new.tolist()}", sep="\n", flush=True)
    if model.device.type == "cpu":  # on GPUs, NCCL calls captured in CUDA graphs can block this at exit
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
