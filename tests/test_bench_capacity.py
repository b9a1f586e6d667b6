"""The capacity mode of ``benchmarks/bench_e2e.py``: a cache given the state of a prefill without
running one, decode steps from it through generate's decode path, and the batch search.

A mini Llama (2 layers, 4 query heads over 2 KV heads) in float32 on CPU, for each method of the
benchmark (``bf16-static``, ``bf16-strong``, ``xquant`` with ``xquant-1.38``, residual window 128,
so a 200-token context has keys and values in codes and in the window). The compiled call that
generate's decode steps take (``get_compiled_call``) is replaced by a recorder that runs the model
eagerly: nothing compiles, and the tests see which steps take that path and with what arguments.
"""

import sys
from pathlib import Path

import pytest
import torch

from mini_models import mini_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_e2e  # noqa: E402
from bench_e2e import BatchSearch, decode_from_cache, fill_cache, largest_batch, prepare  # noqa: E402

METHODS = ("bf16-static", "bf16-strong", "xquant")
CONTEXT, NEW = 200, 4
CPU = torch.device("cpu")


def recorded(model):
    """Route ``model``'s compiled decode call through an eager recorder; returns its call list."""
    calls = []

    def compiled_call(*_args, **_kwargs):
        def run(**kwargs):
            calls.append({k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
                          for k, v in kwargs.items()})
            return model(**kwargs)
        return run

    model.get_compiled_call = compiled_call
    return calls


def setup(method):
    model = mini_model("llama", num_hidden_layers=2)
    make_cache = prepare(model, method, "xquant-1.38", CPU, CONTEXT + NEW)
    return model, make_cache, recorded(model)


def prompt(batch=2, seed=0):
    return torch.randint(1, 128, (batch, CONTEXT), generator=torch.Generator().manual_seed(seed))


def lengths(cache):
    return {int(layer.cumulative_length) for layer in cache.layers}


@pytest.fixture(scope="module", params=METHODS)
def prefilled(request):
    """(method, model, make_cache, calls, reference generate output, prefilled cache, next token)."""
    model, make_cache, calls = setup(request.param)
    name = bench_e2e.cache_argument(model)
    ids = prompt()
    ref = model.generate(ids, max_new_tokens=1 + NEW, min_new_tokens=1 + NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **{name: make_cache(2)})
    real = make_cache(2)
    out = model.generate(ids, max_new_tokens=1, do_sample=False, **{name: real})
    assert lengths(real) == {CONTEXT}
    return request.param, model, make_cache, calls, ref, real, out[:, -1:]


def test_decode_from_a_prefilled_cache_continues_generate(prefilled):
    """From a real prefill, decode_from_cache gives what an uninterrupted generate gives, and every
    step, the first too, takes the compiled-call path with the arguments generate's decode steps get."""
    _, model, make_cache, calls, ref, real, nxt = prefilled
    calls.clear()
    name = bench_e2e.cache_argument(model)
    model.generate(prompt(), max_new_tokens=1 + NEW, do_sample=False, **{name: make_cache(2)})
    ref_steps, calls[:] = list(calls), []
    assert len(ref_steps) == NEW  # generate: the prompt eagerly, then NEW decode steps compiled

    out = decode_from_cache(model, real, CONTEXT, NEW, ids=nxt, output_logits=True, return_dict_in_generate=True)
    assert calls == ref_steps
    assert lengths(real) == {CONTEXT + NEW}
    assert torch.equal(out.sequences, ref.sequences[:, CONTEXT:CONTEXT + 1 + NEW])
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits[1:], 1), rtol=0, atol=0)
    assert "_prefill" not in vars(model)  # the patch is undone


def test_fill_from_a_prefill_at_a_larger_batch(prefilled):
    """A larger cache filled from a real prefill's state (fill_cache(source=...)) decodes like it:
    the state is storage plus the length counters, and attention covers the CONTEXT positions."""
    _, model, make_cache, calls, ref, real, nxt = prefilled
    source = make_cache(2)
    name = bench_e2e.cache_argument(model)
    model.generate(prompt(), max_new_tokens=1, do_sample=False, **{name: source})
    big = make_cache(5)
    fill_cache(big, model, 5, CONTEXT, source=source)
    assert lengths(big) == {CONTEXT}
    rows = torch.arange(5) % 2
    calls.clear()
    out = decode_from_cache(model, big, CONTEXT, NEW, ids=nxt[rows], output_logits=True, return_dict_in_generate=True)
    assert len(calls) == NEW and calls[0]["input_ids"] == ((5, 1), torch.long)
    assert lengths(big) == {CONTEXT + NEW}
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits[1:], 1)[rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences, ref.sequences[rows, CONTEXT:CONTEXT + 1 + NEW])


def test_fill_refuses_a_source_of_another_length(prefilled):
    _, model, make_cache, _, _, _, _ = prefilled
    with pytest.raises(ValueError, match="holds 0 tokens"):
        fill_cache(make_cache(3), model, 3, CONTEXT, source=make_cache(2))


@pytest.mark.parametrize("method", METHODS)
def test_random_fill_decodes_at_context(method):
    """Random storage: the decode steps write positions CONTEXT.. (the counters end at CONTEXT + NEW)
    and leave the positions below CONTEXT as filled; the logits are finite."""
    model, make_cache, calls = setup(method)
    cache = make_cache(3)
    fill_cache(cache, model, 3, CONTEXT, seed=1)
    assert lengths(cache) == {CONTEXT}
    before = [{k: t.clone() for k, t in bench_e2e.cache_tensors(layer).items()} for layer in cache.layers]
    assert all(t.abs().sum() > 0 for layer in before for t in layer.values())
    out = decode_from_cache(model, cache, CONTEXT, NEW, output_logits=True, return_dict_in_generate=True)
    assert len(calls) == NEW
    assert lengths(cache) == {CONTEXT + NEW}
    assert all(torch.isfinite(step).all() for step in out.logits)
    for layer, old in zip(cache.layers, before):
        now = bench_e2e.cache_tensors(layer)
        if method.startswith("bf16"):  # [B, H, T, D]: written exactly at CONTEXT .. CONTEXT + NEW - 1
            for name in ("keys", "values"):
                assert torch.equal(now[name][:, :, :CONTEXT], old[name][:, :, :CONTEXT])
                assert not torch.equal(now[name][:, :, CONTEXT:CONTEXT + NEW], old[name][:, :, CONTEXT:CONTEXT + NEW])
                assert torch.equal(now[name][:, :, CONTEXT + NEW:], old[name][:, :, CONTEXT + NEW:])
        else:  # the ring slots of the new positions took the new tokens; value codes of p - R were written
            R = layer.R
            slots = torch.arange(CONTEXT, CONTEXT + NEW) % R
            assert not torch.equal(now["k_window"][:, :, slots], old["k_window"][:, :, slots])
            others = torch.tensor([s for s in range(R) if s not in set(slots.tolist())])
            assert torch.equal(now["k_window"][:, :, others], old["k_window"][:, :, others])
            written = slice(CONTEXT - R, CONTEXT - R + NEW)
            assert not torch.equal(now["v_scale"][:, :, written], old["v_scale"][:, :, written])
            assert torch.equal(now["v_scale"][:, :, : CONTEXT - R], old["v_scale"][:, :, : CONTEXT - R])


# ----------------------------------------------------------------------------- the batch search

def close_enough(best, threshold, granularity, max_batch):
    """The batch found fits and is within the granularity of the largest that does."""
    largest = min(threshold, max_batch)
    return best <= largest and (largest - best < granularity or best == largest)


@pytest.mark.parametrize("granularity", [1, 3, 8])
@pytest.mark.parametrize("guess", [1, 5, 24, 64, 1000])
def test_search_finds_the_largest_fitting_batch(granularity, guess):
    max_batch = 64
    for threshold in range(0, 80):
        probed = []

        def fits(b):
            probed.append(b)
            return b <= threshold

        search = largest_batch(fits, guess, granularity, max_batch, max_probes=100)
        assert close_enough(search.best, threshold, granularity, max_batch), (threshold, search.best, probed)
        assert len(probed) == len(set(probed)) and all(1 <= b <= max_batch for b in probed)
        assert len(probed) <= 2 * max_batch.bit_length() + 2, (threshold, probed)
        assert search.next() is None


def test_search_from_a_close_guess_takes_few_probes():
    probed = []
    search = largest_batch(lambda b: probed.append(b) or b <= 236, 224, 8, 4096)
    assert search.best == 232 and probed == [224, 232, 248, 240]
    probed.clear()
    search = largest_batch(lambda b: probed.append(b) or b <= 27, 28, 1, 4096)
    assert search.best == 27 and probed == [28, 27]


def test_search_stops_at_max_probes_with_the_best_so_far():
    search = largest_batch(lambda b: b <= 100, 10, 1, 4096, max_probes=3)
    assert [b for b, _ in search.probes] == [10, 11, 13] and search.best == 13
    assert BatchSearch(5, 1, 4).next() == 4  # the guess is capped at max_batch
    assert bench_e2e.auto_granularity(30) == 1 and bench_e2e.auto_granularity(200) == 4


def test_out_of_memory_errors():
    assert bench_e2e.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert bench_e2e.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not bench_e2e.is_out_of_memory(RuntimeError("shape mismatch"))
    try:  # a CUDA graph capture that an allocation failure ended raises its own error on exit
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as err:
        assert bench_e2e.is_out_of_memory(err)


# ----------------------------------------------------------------------------- the command

def test_capacity_command_on_cpu(monkeypatch, tmp_path, capsys):
    """``--capacity`` end to end, a mini model in place of the named one and the decode call eager:
    the search finds the batch --oom-above allows (out of memory raised inside the step), every
    method gets a row with x_strong, and --append keeps earlier rows."""
    monkeypatch.setattr(bench_e2e, "build", lambda *a, **k: mini_model("llama", num_hidden_layers=2))
    original = bench_e2e.prepare

    def eager_prepare(model, *args, **kwargs):
        make_cache = original(model, *args, **kwargs)
        recorded(model)
        return make_cache

    monkeypatch.setattr(bench_e2e, "prepare", eager_prepare)
    argv = ["--models", "mini", "--capacity", "--device", "cpu", "--contexts", str(CONTEXT), "--new", "4",
            "--methods", "bf16-strong", "xquant", "--start-batch", "4", "--max-batch", "16", "--granularity", "1",
            "--oom-above", "9", "--out", str(tmp_path)]
    assert bench_e2e.main(argv) == 0
    rows = bench_e2e.read_rows(tmp_path / "e2e.csv")
    assert [r["method"] for r in rows] == ["bf16-strong", "xquant-1.38"]
    for r in rows:
        assert r["mode"] == "capacity" and r["batch"] == "9" and r["search"] == "done" and r["limit"] == "10"
        assert "oom(step)" in r["probes"] and float(r["tokens_per_s"]) > 0
        assert float(r["seq_mib"]) > 0
    assert rows[0]["x_strong"] == "1.0"
    assert "| capacity |" in (tmp_path / "e2e.md").read_text()
    out = capsys.readouterr().out
    assert "probe 1: batch 4 ok" in out

    assert bench_e2e.main(argv[:-2] + ["--methods", "bf16-static", "--append", "--out", str(tmp_path)]) == 0
    rows = bench_e2e.read_rows(tmp_path / "e2e.csv")
    assert [r["method"] for r in rows] == ["bf16-strong", "xquant-1.38", "bf16-static"]
    assert rows[2]["x_strong"] != ""


def test_capacity_command_retries_an_error_after_an_out_of_memory_step(monkeypatch, tmp_path):
    """xquant keeps its compiled step across probes: an error right after a step that ran out of
    memory gets one fresh retry of the same batch; a second error ends the search, keeping the best."""
    monkeypatch.setattr(bench_e2e, "build", lambda *a, **k: mini_model("llama", num_hidden_layers=2))
    original_prepare, original_decode = bench_e2e.prepare, bench_e2e.decode_from_cache
    errors = {"left": 1}

    def eager_prepare(model, *args, **kwargs):
        make_cache = original_prepare(model, *args, **kwargs)
        recorded(model)
        return make_cache

    def flaky_decode(model, cache, context, steps, **kwargs):
        batch = cache.max_batch_size
        if batch > 6:
            raise torch.OutOfMemoryError("fake")
        if batch == 6 and errors["left"]:
            errors["left"] -= 1
            raise RuntimeError("fake error after an out-of-memory step")
        return original_decode(model, cache, context, steps, **kwargs)

    monkeypatch.setattr(bench_e2e, "prepare", eager_prepare)
    monkeypatch.setattr(bench_e2e, "decode_from_cache", flaky_decode)
    argv = ["--models", "mini", "--capacity", "--device", "cpu", "--contexts", str(CONTEXT), "--new", "4",
            "--methods", "xquant", "--start-batch", "4", "--max-batch", "16", "--granularity", "1",
            "--out", str(tmp_path)]
    assert bench_e2e.main(argv) == 0
    (row,) = bench_e2e.read_rows(tmp_path / "e2e.csv")
    assert row["probes"] == "4:ok 5:ok 7:oom(step) 6:error 6:ok" and row["batch"] == "6" and row["search"] == "done"

    errors["left"] = 2  # fails again: the search stops there with what it has
    assert bench_e2e.main(argv) == 0
    (row,) = bench_e2e.read_rows(tmp_path / "e2e.csv")
    assert row["probes"] == "4:ok 5:ok 7:oom(step) 6:error 6:error" and row["batch"] == "5"
    assert row["search"].startswith("error at 6: RuntimeError")
