"""The demo command: arguments refused before the model loads, the program name, and the report's
structure and numbers on a mini model (the real SmolLM2 run is in test_smollm2.py)."""

import subprocess
import sys

import pytest
import torch

from mini_models import mini_model
from xquant_fx import XQuantCache, XQuantConfig, smollm2
from xquant_fx.cli import demo
from xquant_fx.api import cache_argument
from xquant_fx.cli import main as cli_main


class CharTokenizer:
    """Characters folded into the mini models' 128-token vocabulary; enough for the demo."""

    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt=True, return_tensors="pt"):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return torch.tensor([[3 + ord(c) % 125 for c in text]])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


@pytest.fixture(scope="module")
def mini():
    return mini_model("llama", num_hidden_layers=4)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(smollm2, "load", refuse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "not-a-device"], "--device 'not-a-device': not a device"),
        (["--question", "   "], "--question is empty"),
        (["--context-tokens", "8192", "0"], "--context-tokens 8192 0: each must be at least 1"),
        (["--preset", "kivi-2:v_share_from=40"], "v_share_from=40: the model has 30 layers"),
        (["--preset", "kivi-2:group_size=128"], "head_dim 64 is not a multiple of group_size 128"),
        (["--preset", "xquant-1.38:moe_top_k=2"], "sets MoE options"),
        (["--max-new-tokens", "8192"], "--max-new-tokens 8192: SmolLM2-135M-Instruct's context is 8192 tokens"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(no_model_load, capsys, argv, message):
    assert cli_main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, argparse style
    assert err.startswith(("python -m xquant_fx demo: error:", "pytest demo: error:"))


def test_cuda_device_without_cuda_is_refused(no_model_load, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["demo", "--device", "cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err


def test_unknown_preset_is_a_usage_error(no_model_load, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", "--preset", "bogus"])
    assert exc.value.code == 2
    assert "unknown preset 'bogus'" in capsys.readouterr().err


def test_program_name_follows_the_invocation(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/some/venv/bin/xquant"])
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: xquant ")
    # The module form, in a fresh process: its name, and nothing on stderr (no import warnings).
    done = subprocess.run([sys.executable, "-m", "xquant_fx", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m xquant_fx ")
    assert done.stderr == ""


def test_decode_agreement_and_answer(mini):
    """The demo's own answer is greedy generation's; its agreement is counted on the reference's
    inputs, step by step, as a plain loop counts it."""
    model, tok = mini, CharTokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "x" * 40 + demo.ZEN[:120]}])
    assert ids.shape[1] > 128  # part of the prompt leaves the full-precision window
    stop = {tok.eos_token_id}
    fp16, kivi = XQuantConfig.preset("fp16"), XQuantConfig.preset("kivi-2")
    ref = demo.decode(model, ids, fp16, 12, stop)
    arg = cache_argument(model)
    cache = XQuantCache(model.config, fp16, max_cache_len=ids.shape[1] + 12)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, **{arg: cache})
    assert ref.tokens == out[0, ids.shape[1]:].tolist()
    assert ref.agreement is None and ref.steps == len(ref.tokens) - 1

    same = demo.decode(model, ids, fp16, 12, stop, reference=ref.tokens)
    assert same.agreement == (len(ref.tokens), len(ref.tokens)) and same.tokens == ref.tokens

    # A reference that differs from what the model would say: agreement counts exactly the steps
    # whose greedy token (after the reference's own prefix) is the reference's.
    wrong = [(t + 1) % 128 if i % 2 else t for i, t in enumerate(ref.tokens)]
    wrong = [t if t != 2 else 5 for t in wrong]
    got = demo.decode(model, ids, kivi, 12, stop, reference=wrong)
    cache = XQuantCache(model.config, kivi, max_cache_len=ids.shape[1] + 12)
    expected = 0
    with torch.no_grad():
        logits = model(ids, **{arg: cache}).logits[0, -1]
        for t, token in enumerate(wrong):
            expected += int(logits.argmax()) == token
            logits = model(torch.tensor([[token]]), **{arg: cache}).logits[0, -1]
    assert got.agreement == (expected, len(wrong))
    assert 0 < expected < len(wrong)


def test_report_on_a_mini_model(mini, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "load", lambda dtype=None, device="cpu": (mini, CharTokenizer()))
    question = "q" * 200  # > 128 tokens: the quantized caches read part of it back from codes
    assert cli_main(["demo", "--max-new-tokens", "5", "--device", "cpu", "--question", question]) == 0
    out = capsys.readouterr().out
    prose = " ".join(out.split())  # the report wraps its sentences at 100 columns
    # The answers, in order: full precision, the baseline, the preset.
    heads = [out.index(f"--- {name} ---") for name in ("full precision", "kivi-2", "xquant-1.38")]
    assert heads == sorted(heads)
    assert "16 bits per value" in prose and "4-bit weights" in prose
    quality = out[out.index("Quality"):out.index("KV cache per sequence")]
    assert "reference" in quality and "tokens/s" in quality
    rows = [line.split() for line in quality.splitlines() if line.startswith(("kivi-2", "xquant-1.38"))]
    assert len(rows) == 2
    for row in rows:
        agree, steps = row[1].split("/")
        assert 0 <= int(agree) <= int(steps) <= 5
    memory = out[out.index("KV cache per sequence"):]
    header = next(line for line in memory.splitlines() if line.startswith("cache"))
    assert header.split("  ")[0] == "cache" and "stored bits @ 8k" in header and "MiB @ 32k" in header
    table = {line.split()[0]: line.split() for line in memory.splitlines() if line.startswith(("fp16", "kivi-2", "xq"))}
    # fp16 row: 16 code bits (not the fp32 run's 32) and the bytes of a bf16 cache, 4 layers x 2 KV
    # heads x 64 x (K and V) x 2 bytes = 2 KiB per token; the others smaller.
    assert table["fp16"][3:8] == ["16", "16.00", "16.0", "16.00", "64.0"]
    assert table["kivi-2"][1] == "2" and 2 < float(table["kivi-2"][4]) < float(table["kivi-2"][2]) < 16
    for column, length in ((3, 8192), (5, 32768)):
        expected = XQuantCache(mini.config, "xquant-1.38", max_cache_len=length).memory_report(torch.bfloat16)
        assert table["xquant-1.38"][column] == f"{expected['bytes'] / 2**20:,.1f}"
        assert table["xquant-1.38"][column - 1] == f"{expected['stored_bits']:.2f}"
    assert table["xquant-1.38"][-1] == f"{expected['bf16_bytes'] / expected['bytes']:.1f}x"
    # Why this fp32 run stores more bits than the table says, and why its speed is no GPU figure.
    fp32 = XQuantCache(mini.config, "xquant-1.38", max_cache_len=8192).memory_report(torch.float32)
    assert f"keeps them in float32, so here xquant-1.38 holds {fp32['stored_bits']:.2f} bits" in prose
    assert "uncompiled" in prose and "fused Triton kernels" in prose
