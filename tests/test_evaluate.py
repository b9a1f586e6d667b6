"""The evaluation harness: decode-condition perplexity is exactly token-by-token generation; the
pass-key retrieval cases are what they say, and are scored through the quantized cache."""

import dataclasses
import math
import re
from types import SimpleNamespace

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
            "--depths", "0.2", "0.6", "--retrieval-lengths", "160", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "kivi-2" in out and "top-1 agreement" in out
    csv_text = (tmp_path / "eval.csv").read_text()
    assert csv_text.splitlines()[0].startswith("config,code_bits,stored_bits,ppl")
    assert len(csv_text.splitlines()) == 3
    assert all(re.search(r",[0-2]/2,", line) for line in csv_text.splitlines()[1:])  # k/N, N = 2 depths x 1 length
    assert "depths=0.2/0.6 lengths=160 seed=0" in csv_text
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
        (["--retrieval-lengths", "512", "32"], "--retrieval-lengths 32: must be at least 64"),
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


# ------------------------------------------------------------------------------------ pass-key retrieval
class CharTokenizer:
    """One token per character (ASCII code), BOS (1) first when special tokens are asked for."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [ord(c) % 128 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def mini():
    """A random Llama whose greedy tokens follow its input (with the default init, std 0.02, it
    answers one token to everything)."""
    from mini_models import mini_model

    return mini_model("llama", initializer_range=0.2)


def test_retrieval_cases_hold_the_key_at_the_stated_depth_and_length():
    tok = CharTokenizer()
    lengths, depths = (300, 700), (0.0, 0.3, 0.5, 0.875, 1.0)
    cases = evaluate.retrieval_cases(tok, lengths, depths, seed=3)
    assert [(c.length, c.depth) for c in cases] == [(n, d) for n in lengths for d in depths]
    intro = len(tok(evaluate.RETRIEVAL_INTRO).input_ids)  # BOS included
    longest = max(len(" " + s) for s in evaluate.RETRIEVAL_FILLER)
    for c in cases:
        assert len(c.prompt) == c.length and c.prompt[0] == 1
        assert re.fullmatch(r"[1-9]\d{4}", c.key) and tok.decode(c.answer) == c.key
        text = tok.decode(c.prompt[1:])
        assert text.endswith(evaluate.RETRIEVAL_QUESTION + " ")  # the answer started, the key not given
        assert tok.decode(c.prompt[c.needle_start : c.needle_start + c.needle_len]) == \
            evaluate.RETRIEVAL_NEEDLE.format(key=c.key)
        assert text.count(c.key) == 1  # only in the needle
        assert c.needle_start == intro + c.filler_before
        assert c.length == intro + c.filler_len + c.needle_len + len(evaluate.RETRIEVAL_QUESTION) + 1
        # at the sentence boundary nearest the depth
        assert abs(c.filler_before - c.depth * c.filler_len) <= longest / 2
        before = tok.decode(c.prompt[intro : c.needle_start])
        assert before == "" or before.endswith(".")
    first, last = [c for c in cases if c.depth == 0.0], [c for c in cases if c.depth == 1.0]
    assert all(c.filler_depth == 0 for c in first) and all(c.filler_depth == 1 for c in last)
    for n in lengths:  # deeper, later (distinct at 700 tokens: some 500 of filler, ~20 characters a sentence)
        starts = [c.needle_start for c in cases if c.length == n]
        assert starts == sorted(starts) and (n < 700 or len(set(starts)) == len(starts))


def test_retrieval_cases_are_seeded_and_independent_of_each_other():
    tok = CharTokenizer()
    cases = evaluate.retrieval_cases(tok, (300, 500), (0.25, 0.75), seed=0)
    assert cases == evaluate.retrieval_cases(tok, (300, 500), (0.25, 0.75), seed=0)
    assert evaluate.retrieval_cases(tok, (500,), (0.75,), seed=0) == [cases[3]]  # whatever runs with it
    assert [c.key for c in evaluate.retrieval_cases(tok, (300, 500), (0.25, 0.75), seed=1)] != [c.key for c in cases]
    default = evaluate.retrieval_cases(tok)
    assert len(default) == 24 and len({c.key for c in default}) == 24
    assert {c.length for c in default} == {512, 1024, 2048} and max(c.depth for c in default) <= 0.875
    with pytest.raises(ValueError, match="retrieval length 100: too short"):
        evaluate.retrieval_cases(tok, (100,), (0.5,))


def test_retrieval_cases_with_the_smollm2_tokenizer(smol):
    _, tok = smol
    for c in evaluate.retrieval_cases(tok, (512, 2048), (0.0, 0.5, 0.875)):
        assert len(c.prompt) == c.length
        assert len(c.answer) == 5 and tok.decode(c.answer) == c.key  # a digit a token, the space in the prompt
        assert tok.decode(c.prompt).endswith("What is the pass key? The pass key is ")
        assert tok.decode(c.prompt).count(c.key) == 1
        assert c.key in tok.decode(c.prompt[c.needle_start : c.needle_start + c.needle_len])
        assert c.length - c.needle_start > 0.1 * c.length  # far from the end, even at 0.875


def test_retrieval_hits_need_the_whole_key():
    case = evaluate.retrieval_cases(CharTokenizer(), (300,), (0.5,))[0]
    key = list(case.answer)
    answers = [key, key + [7], key[:-1], key[:-1] + [key[-1] + 1], [], [key[0] + 1] + key[1:]]
    assert evaluate.retrieval_hits([case] * 6, answers) == [True, True, False, False, False, False]


def test_retrieve_fp16_equals_plain_greedy_generation(mini):
    cases = evaluate.retrieval_cases(CharTokenizer(), (300, 360), (0.1, 0.6))
    answers = evaluate.retrieve(mini, cases, XQuantConfig.preset("fp16"), stop_early=False)
    for case, answer in zip(cases, answers):
        out = mini.generate(torch.tensor([case.prompt]), max_new_tokens=len(case.answer), do_sample=False)
        assert answer == out[0, case.length :].tolist()


def test_retrieve_decodes_every_answer_token_from_the_quantized_cache(mini):
    """Batched cases equal each case alone, which is: all but the prompt's last token prefilled into
    the XQuantCache, then one token per step, the first answer token included."""
    xq = XQuantConfig.from_spec("kivi-2:residual_length=32")
    cases = evaluate.retrieval_cases(CharTokenizer(), (300, 360), (0.1, 0.6))
    batched = evaluate.retrieve(mini, cases, xq, stop_early=False)
    assert batched == [evaluate.retrieve(mini, [c], xq, stop_early=False)[0] for c in cases]
    case, arg = cases[0], cache_argument(mini)
    cache = XQuantCache(mini.config, xq, max_cache_len=case.length + len(case.answer) - 1)
    ids, answer = torch.tensor([case.prompt]), []
    with torch.no_grad():
        mini(ids[:, :-1], **{arg: cache})
        token = ids[:, -1:]
        for _ in case.answer:
            token = mini(token, **{arg: cache}).logits[:, -1].argmax(-1, keepdim=True)
            answer.append(int(token))
    assert batched[0] == answer
    assert batched != evaluate.retrieve(mini, cases, XQuantConfig.preset("fp16"), stop_early=False)


def test_retrieval_counts_the_cases_whose_greedy_answer_is_the_key(mini):
    cases = evaluate.retrieval_cases(CharTokenizer(), (300,), (0.2, 0.5, 0.8))
    fp16 = XQuantConfig.preset("fp16")
    greedy = evaluate.retrieve(mini, cases, fp16, stop_early=False)
    rigged = [dataclasses.replace(c, answer=tuple(a)) for c, a in zip(cases, greedy)]  # keys it does answer
    assert evaluate.retrieval(mini, rigged, fp16) == [True, True, True]
    rigged[1] = dataclasses.replace(rigged[1], answer=rigged[1].answer[:-1] + ((rigged[1].answer[-1] + 1) % 128,))
    assert evaluate.retrieval(mini, rigged, fp16) == [True, False, True]
    # the real keys: a random model misses them all, and the batch stops at its first wrong tokens
    early = evaluate.retrieve(mini, cases, fp16)
    assert evaluate.retrieval_hits(cases, early) == [False] * 3
    assert len({len(a) for a in early}) == 1 and len(early[0]) < len(cases[0].answer)


def test_evaluate_runs_the_same_retrieval_cases_for_every_config(mini, monkeypatch):
    seen, real = [], evaluate.retrieval
    monkeypatch.setattr(evaluate, "retrieval", lambda model, cases, xq, progress=False:
                        seen.append(cases) or real(model, cases, xq, progress))
    rows = evaluate.evaluate(mini, CharTokenizer(), ["fp16", "kivi-2:residual_length=32"], "hello world. " * 20,
                             segments=1, segment_len=64, prefill=16, depths=(0.25, 0.75), lengths=(300, 340),
                             progress=False)
    assert all(re.fullmatch(r"[0-4]/4", r.retrieval) for r in rows)
    assert len(seen) == 2 and seen[0] == seen[1] == evaluate.retrieval_cases(CharTokenizer(), (300, 340), (0.25, 0.75))
    assert evaluate.evaluate(mini, CharTokenizer(), ["fp16"], "hello world. " * 20, segments=1, segment_len=64,
                             prefill=16, depths=(0.5,), lengths=(), progress=False)[0].retrieval == "0/0"


@pytest.mark.parametrize("lengths,message", [((1020,), "at most 1024 positions"), ((100,), "too short")])
def test_evaluate_checks_retrieval_lengths_before_running(mini, monkeypatch, lengths, message):
    monkeypatch.setattr(evaluate, "decode_nll", lambda *a, **k: pytest.fail("ran a config"))
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(mini, CharTokenizer(), ["fp16"], "hello world. " * 20, segments=1, segment_len=64,
                          prefill=16, depths=(0.5,), lengths=lengths, progress=False)
