"""How much does activating fewer experts change an MoE model? Measure it on your own checkpoint.

    python examples/moe_agreement.py --model /path/to/Qwen3-30B-A3B --top-k 4 --text eval.txt
    python examples/moe_agreement.py --model /path/to/DeepSeek-V2-Lite --top-k 6,4,4,2 --text eval.txt
    python examples/moe_agreement.py --model /path/to/Qwen3-30B-A3B --drop-experts 96 --text eval.txt
    python examples/moe_agreement.py --random qwen3-30b-a3b --layers 1 --top-k 4    # random weights: a dry run

Teacher-forced on the tokens of ``--text`` (random tokens with ``--random``), with the model's own
routing and with ``--top-k`` (an int, or one k per MoE layer, as ``XQuantConfig.moe_top_k``), or
with each layer's least-used experts removed (``--drop-experts``: experts kept per layer, or the
kept fraction; :func:`xquant_fx.moe.drop_experts`, soft counts from the first half of the tokens,
scored on the second):

* per MoE layer: the block's output with the pruned routing against its output with the model's
  routing, on the hidden states the unpruned model gives that layer (relative error, cosine);
* whole model: how often the next-token argmax agrees, and the perplexity of the text both ways.

With ``--top-k`` the pruned runs go through the same ``xquant`` backend and graph passes as
``optimize(model, XQuantConfig(moe_top_k=...))``; with ``--drop-experts`` the weights themselves
change, as they would before ``optimize``. These numbers describe your model on your text:
a layer whose routing is peaked loses little when experts are dropped, a flat one more. Check the
task you care about (generations, accuracy) before shipping a k or a smaller model.
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
from xquant_fx.moe import drop_experts, expert_usage, find_moe_layers, install_experts  # noqa: E402


def _pruned(module, top_k):
    torch._dynamo.reset()
    return torch.compile(module, backend="xquant", fullgraph=True, options={"moe_top_k": top_k})


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture(model, ids: torch.Tensor, layers) -> dict:
    """Each MoE block's input and output (block name -> (x, y)) when ``model`` runs ``ids``."""
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
    return seen


def _difference(got: torch.Tensor, want: torch.Tensor) -> dict:
    a, b = got.float().flatten(0, -2), want.float().flatten(0, -2)
    return dict(rel_error=((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
                cosine=F.cosine_similarity(a, b, dim=-1).mean().item())


def layer_agreement(model, ids: torch.Tensor, top_k) -> list[dict]:
    """Per MoE layer: ``{layer, k, model_k, rel_error, cosine}`` of the block's output with ``top_k``
    against the model's own routing, on the hidden states of ``ids`` in the unpruned model."""
    install_experts(model)
    layers = find_moe_layers(model, required=True)
    ks = XQuantConfig(moe_top_k=top_k).resolve_moe_top_k(len(layers), layers[0].top_k)
    seen = _capture(model, ids, layers)
    rows = []
    for m, k in zip(layers, ks):
        x, full = seen[m.name]
        with torch.no_grad():
            got = _output(_pruned(model.get_submodule(m.name), k)(x))
        rows.append(dict(layer=m.layer, k=k, model_k=m.top_k, **_difference(got, full)))
    torch._dynamo.reset()
    return rows


def drop_agreement(model, calibration: torch.Tensor, ids: torch.Tensor, keep) -> tuple[list[dict], dict]:
    """Drop each layer's least-used experts (:func:`xquant_fx.moe.drop_experts`, soft counts from
    ``calibration``), in place; returns per-layer rows (``{layer, experts, kept, usage_kept,
    rel_error, cosine}`` on the hidden states of ``ids`` before the drop) and the whole-model
    comparison of :func:`model_agreement`."""
    layers = find_moe_layers(model, required=True)
    seen = _capture(model, ids, layers)
    with torch.no_grad():
        full = model(ids).logits
    report = drop_experts(model, keep, expert_usage(model, [calibration]))
    rows = []
    for m in layers:
        x, want = seen[m.name]
        with torch.no_grad():
            got = _output(model.get_submodule(m.name)(x))
        rows.append(dict(layer=m.layer, experts=m.num_experts, kept=len(report.kept[m.layer]),
                         usage_kept=report.usage_kept[m.layer], **_difference(got, want)))
    with torch.no_grad():
        dropped = model(ids).logits
    whole = _whole(full, dropped, ids)
    whole["expert_bytes"] = (report.bytes_before, report.bytes_after)
    return rows, whole


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
    return _whole(full, pruned, ids)


def _whole(full: torch.Tensor, pruned: torch.Tensor, ids: torch.Tensor) -> dict:
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


def parse_keep(text: str):
    """``"48"`` -> 48 experts, ``"0.75"`` -> that fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--drop-experts takes an int or a fraction, got {text!r}") from None


def _load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        text = Path(args.text).read_text() if args.text else "The quick brown fox jumps over the lazy dog. " * 64
        ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    else:
        from xquant_fx.memory import load_config, with_layers

        config = with_layers(load_config(args.random), args.layers)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    return model, ids.to(args.device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local transformers checkpoint directory")
    src.add_argument("--random", metavar="CONFIG", help="random weights from a bundled config (dry run)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--top-k", type=parse_top_k, help="experts activated per token (int, or one per MoE layer)")
    what.add_argument("--drop-experts", type=parse_keep, metavar="KEEP",
                      help="experts kept per layer (int) or kept fraction (float), by soft count on the first half "
                           "of the tokens; scored on the second half")
    p.add_argument("--text", help="text file to score (with --model)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of --random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    from tabulate import tabulate

    model, ids = _load(args)
    if args.drop_experts is not None:
        half = ids.shape[1] // 2
        rows, whole = drop_agreement(model, ids[:, :half], ids[:, half:], args.drop_experts)
        change = f"dropped experts (keep={args.drop_experts}); routed-expert bytes {whole['expert_bytes'][0] / 2**20:.1f} -> " \
                 f"{whole['expert_bytes'][1] / 2**20:.1f} MiB"
        scored = ids.shape[1] - half
    else:
        rows = layer_agreement(model, ids, args.top_k)
        whole = model_agreement(model, ids, args.top_k)
        change, scored = f"top_k={args.top_k}", ids.shape[1]
    print(tabulate(rows, headers="keys", floatfmt=".4f"))
    print(f"\n{scored} tokens: next-token agreement {whole['agreement']:.4f}, perplexity "
          f"{whole['ppl_model_k']:.3f} (the model as it was) -> {whole['ppl_pruned']:.3f} ({change})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
