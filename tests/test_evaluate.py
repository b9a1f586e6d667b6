"""The evaluation harness: decode-condition perplexity is exactly token-by-token generation."""

import math

import pytest
import torch

from xquant_fx import XQuantCache, XQuantConfig, evaluate, smollm2
from xquant_fx.api import cache_argument
from xquant_fx.cli import main as cli_main


@pytest.fixture(scope="module")
def smol():
    return smollm2.load(torch.float32)


def test_batched_decode_perplexity_equals_token_by_token(smol):
    """Scoring segments as a batch equals feeding each segment alone through the cache."""
    model, tokenizer = smol
    ids = tokenizer(evaluate.default_corpus(), return_tensors="pt").input_ids[0, : 2 * 170].view(2, 170)
    xq = XQuantConfig.preset("xquant-1.38")
    nll, _ = evaluate.decode_nll(model, ids, xq, prefill=64)
    arg = cache_argument(model)
    for row in range(2):
        cache = XQuantCache(model.config, xq, max_cache_len=170)
        total = 0.0
        with torch.no_grad():
            for t in range(169):  # token by token from the start, as generation does
                logits = model(ids[row : row + 1, t : t + 1], **{arg: cache}).logits[0, -1]
                if t + 1 >= 64:
                    total += torch.nn.functional.cross_entropy(logits[None], ids[row, t + 1 : t + 2]).item()
        ppl_alone = math.exp(total / 106)
        ppl_batched = math.exp(nll[row].double().mean().item())
        assert ppl_batched == pytest.approx(ppl_alone, rel=1e-3)


def test_eval_command_writes_table_csv_and_plot(tmp_path, capsys):
    args = ["eval", "--presets", "fp16", "kivi-2", "--segments", "2", "--segment-len", "160", "--prefill", "128",
            "--depths", "0.9", "--filler", "20", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "kivi-2" in out and "top-1 agreement" in out
    csv_text = (tmp_path / "eval.csv").read_text()
    assert csv_text.splitlines()[0].startswith("config,code_bits,stored_bits,ppl")
    assert len(csv_text.splitlines()) == 3
    assert (tmp_path / "eval.png").stat().st_size > 1000
