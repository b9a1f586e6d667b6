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


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        (["--text", "/nonexistent/corpus.txt"], "--text /nonexistent/corpus.txt: no such file"),
        (["--prefill", "200"], "--prefill 200: must be at most the smallest residual_length of the configs (128)"),
        (["--presets", "kivi-2:residual_length=64"], "--prefill 128: must be at most the smallest residual_length"),
        (["--segment-len", "100"], "below --segment-len 100"),
        (["--segments", "0"], "--segments 0: must be at least 1"),
        (["--depths", "0.5", "1.5"], "--depths 1.5: depths are fractions"),
        (["--filler", "-1"], "--filler -1: must be at least 0"),
        (["--search-stored", "0"], "--search-stored 0: a positive number"),
        (["--presets", "kivi-2:moe_top_k=2"], "--presets kivi-2:moe_top_k=2: MoE options"),
    ],
)
def test_eval_refuses_bad_arguments_before_loading(monkeypatch, capsys, argv, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(smollm2, "load", refuse)
    assert cli_main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_eval_refuses_unusable_files_and_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "load", lambda *a, **k: pytest.fail("loaded the model"))
    corpus = tmp_path / "corpus.txt"
    cases = []
    corpus.write_bytes(b"\xff\xfe not utf-8")
    cases.append((["--text", str(corpus)], "not UTF-8 text"))
    (tmp_path / "empty.txt").write_text(" \n")
    cases.append((["--text", str(tmp_path / "empty.txt")], "the file is empty"))
    cases.append((["--text", str(tmp_path)], "not a file"))
    (tmp_path / "results").write_text("a file where the results directory should go")
    cases.append((["--out", str(tmp_path / "results")], "exists and is not a directory"))
    cases.append((["--search-text", str(tmp_path / "empty.txt")], "--search-text is used by --search only"))
    cases.append((["--model", str(tmp_path)], "not a Hugging Face model directory (no config.json in it)"))
    for argv, message in cases:
        assert cli_main(["eval", *argv, "--out", str(tmp_path / "out")] if "--out" not in argv
                        else ["eval", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()  # nothing written on a refused run


def test_eval_model_directory_that_does_not_load(tmp_path, capsys):
    """A directory with a config but no weights: transformers' error, in one line."""
    from test_memory import _config_file

    _config_file(tmp_path)
    assert cli_main(["eval", "--model", str(tmp_path), "--presets", "kivi-2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--model {tmp_path}: cannot load a causal LM and its tokenizer" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_evaluate_checks_prefill_against_every_config_first(smol, monkeypatch):
    """A prefill longer than a later config's window fails before the first config runs."""
    model, tokenizer = smol
    ran = []
    monkeypatch.setattr(evaluate, "decode_nll", lambda *a, **k: ran.append(a) or pytest.fail("ran a config"))
    with pytest.raises(ValueError, match=r"prefill=100: must be in \[1, min\(residual_length of every config = 64"):
        evaluate.evaluate(model, tokenizer, ["fp16", "kivi-2", "kivi-2:residual_length=64"], segments=1,
                          segment_len=160, prefill=100, depths=())
    assert not ran
