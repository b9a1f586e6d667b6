"""On a CUDA machine: ``XQuantCache(..., device=)`` takes ``"cuda"``, ``"cuda:0"`` and
``torch.device("cuda")`` alike (issue 16's device strings; CPU tests check the same by
construction with ``"cpu"`` / ``"cpu:0"``, ``tests/test_serving.py``).

    python benchmarks/check_device_strings.py

For each spelling: a mini Llama (random weights, bf16) prefills 40 tokens and decodes 8 through
an ``XQuantCache`` built with that ``device``; the logits must equal those of the ``"cuda:0"``
cache bit for bit, and the storage must sit on the model's device. Prints one line per spelling
and exits 1 on any failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xquant_fx import XQuantCache  # noqa: E402
from xquant_fx.api import cache_argument  # noqa: E402


def run(model, ids, device) -> torch.Tensor:
    cache = XQuantCache(model.config, "kivi-2:residual_length=32", max_batch_size=ids.shape[0], max_cache_len=64,
                        device=device, dtype=torch.bfloat16)
    arg = cache_argument(model)
    with torch.no_grad():
        logits = [model(ids[:, :40], **{arg: cache}).logits[:, -1]]
        for i in range(40, 48):
            logits.append(model(ids[:, i:i + 1], **{arg: cache}).logits[:, -1])
    where = {t.device for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)}
    if where != {torch.device("cuda", 0)}:
        raise AssertionError(f"storage on {where}")
    return torch.stack(logits)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (CPU spellings are tested in tests/test_serving.py)")
        return 0
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, 256, (2, 48), device="cuda")
    ref = run(model, ids, "cuda:0")
    failed = 0
    for device in ("cuda", torch.device("cuda"), torch.device("cuda", 0)):
        try:
            same = torch.equal(run(model, ids, device), ref)
            print(f"{device!r}: {'ok' if same else 'logits differ from cuda:0'}", flush=True)
            failed += not same
        except Exception as err:  # noqa: BLE001 - report every spelling
            print(f"{device!r}: {type(err).__name__}: {err}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
