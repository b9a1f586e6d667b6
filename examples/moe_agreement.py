"""How much does activating fewer experts change an MoE model? Measure it on your own checkpoint.

    python examples/moe_agreement.py --model /path/to/Qwen3-30B-A3B --top-k 4 --text eval.txt
    python examples/moe_agreement.py --model /path/to/DeepSeek-V2-Lite --top-k 6,4,4,2 --text eval.txt
    python examples/moe_agreement.py --random qwen3-30b-a3b --layers 2 --top-k 4    # random weights: a dry run

Teacher-forced on the tokens of ``--text`` (random tokens with ``--random``), with the model's own
routing and with ``--top-k`` (an int, or one k per MoE layer, as ``XQuantConfig.moe_top_k``):

* per MoE layer: the block's output with the pruned routing against its output with the model's
  routing, on the hidden states the unpruned model gives that layer (relative error, cosine);
* whole model: how often the next-token argmax agrees, and the perplexity of the text both ways.

The pruned runs go through the same ``xquant`` backend and graph passes as
``optimize(model, XQuantConfig(moe_top_k=...))``. These numbers describe your model on your text:
a layer whose routing is peaked loses little when experts are dropped, a flat one more. Check the
task you care about (generations, accuracy) before shipping a k.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xquant_fx import XQuantConfig  # noqa: E402
from xquant_fx.moe import find_moe_layers, install_experts  # noqa: E402


def _pruned(module, top_k):
    torch._dynamo.reset()
    return torch.compile(module, backend="xquant", fullgraph=True, options={"moe_top_k": top_k})


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def layer_agreement(model, ids: torch.Tensor, top_k) -> list[dict]:
    """Per MoE layer: ``{layer, k, model_k, rel_error, cosine}`` of the block's output with ``top_k``
    against the model's own routing, on the hidden states of ``ids`` in the unpruned model."""
    install_experts(model)
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers")
    ks = XQuantConfig(moe_top_k=top_k).resolve_moe_top_k(len(layers), layers[0].top_k)
    seen = {}
    hooks = [
        model.get_submodule(m.name).register_forward_hook(
            lambda mod, args, out, name=m.name: seen.__setitem__(name, (args[0].detach(), _output(out).detach()))
        )
        for m in layers
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for m, k in zip(layers, ks):
        x, full = seen[m.name]
        with torch.no_grad():
            got = _output(_pruned(model.get_submodule(m.name), k)(x))
        a, b = got.float().flatten(0, -2), full.float().flatten(0, -2)
        rows.append(dict(
            layer=m.layer, k=k, model_k=m.top_k,
            rel_error=((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
            cosine=F.cosine_similarity(a, b, dim=-1).mean().item(),
        ))
    torch._dynamo.reset()
    return rows


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return math.exp(loss.item())


def model_agreement(model, ids: torch.Tensor, top_k) -> dict:
    """Whole model, teacher-forced on ``ids``: next-token argmax agreement and perplexity with the
    model's routing and with ``top_k``."""
    install_experts(model)
    with torch.no_grad():
        full = model(ids).logits
        pruned = _pruned(model, top_k)(ids).logits
    torch._dynamo.reset()
    return dict(
        agreement=(full.argmax(-1) == pruned.argmax(-1)).float().mean().item(),
        ppl_model_k=_perplexity(full, ids),
        ppl_pruned=_perplexity(pruned, ids),
    )


def parse_top_k(text: str):
    """``"4"`` -> 4, ``"6,4,4,2"`` -> [6, 4, 4, 2] (one per MoE layer)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k takes an int or comma-separated ints, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        text = Path(args.text).read_text() if args.text else "The quick brown fox jumps over the lazy dog. " * 64
        ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    else:
        from xquant_fx.memory import load_config

        config = load_config(args.random)
        config.num_hidden_layers = args.layers
        for attr in ("layer_types", "mlp_only_layers"):
            if isinstance(getattr(config, attr, None), list) and getattr(config, attr):
                setattr(config, attr, getattr(config, attr)[: args.layers])
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    return model, ids.to(args.device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local transformers checkpoint directory")
    src.add_argument("--random", metavar="CONFIG", help="random weights from a bundled config (dry run)")
    p.add_argument("--top-k", type=parse_top_k, required=True)
    p.add_argument("--text", help="text file to score (with --model)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of --random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    from tabulate import tabulate

    model, ids = _load(args)
    rows = layer_agreement(model, ids, args.top_k)
    print(tabulate(rows, headers="keys", floatfmt=".4f"))
    whole = model_agreement(model, ids, args.top_k)
    print(f"\n{ids.shape[1]} tokens: next-token agreement {whole['agreement']:.4f}, perplexity "
          f"{whole['ppl_model_k']:.3f} (model's k) -> {whole['ppl_pruned']:.3f} (top_k={args.top_k})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
