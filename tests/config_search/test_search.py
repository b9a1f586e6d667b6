"""Config search: the decode simulator equals the cache's decode, and search() keeps its promises
(budget, clear minimum, determinism, monotone in the budget, usable configs, honest sharing)."""

import math

import pytest
import torch

from mini_models import mini_model
from xquant_fx import XQuantCache, XQuantConfig, evaluate
from xquant_fx.api import cache_argument
from xquant_fx.cli import main as cli_main
from xquant_fx.config import LayerPlan
from xquant_fx.config_search import (
    DecodeSimulator,
    QualityOptions,
    Score,
    Sensitivity,
    allocate,
    calibration_text,
    check_disjoint,
    minimum_code_bits,
    search,
    sharing_rates,
)

G, R, P = 32, 64, 64  # small window so that 160-token windows quantize most of their past
LAYERS = 6
BUDGETS = [0.75, 1.0, 1.25, 1.5, 2.0]


class ByteTokenizer:
    """Text -> UTF-8 bytes folded into a small vocabulary (enough for the mini models)."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[b % self.vocab for b in text.encode()]])
        return type("Encoding", (), {"input_ids": ids})()


@pytest.fixture(scope="module")
def mini():
    return mini_model("llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def ids():
    return ByteTokenizer()(calibration_text()).input_ids[0, : 2 * 160].view(2, 160)


@pytest.fixture(scope="module")
def found(mini, ids):
    """One search call for several budgets (the measurements are shared)."""
    return search(mini, BUDGETS, input_ids=ids, residual_length=R, prefill=P)


def _decode_nll_mean(model, ids, config, prefill):
    nll, _ = evaluate.decode_nll(model, ids, config, prefill)
    return nll.double().mean().item()


# ----------------------------------------------------------------------------- simulator
@pytest.mark.parametrize("config", [
    XQuantConfig(k_bits=16, v_bits=16, residual_length=R),
    XQuantConfig(k_bits=2, v_bits=1, residual_length=R, eta={1: 1 / 6, 2: 0.09}),
    XQuantConfig(k_bits=(1, 1, 2, 2, 4, 1), v_bits=(2, 1, 1, 1, 1, 1), k_share_from=0, v_share_from=2,
                 residual_length=R, eta={1: 1 / 3, 2: 0.045}),
    XQuantConfig(k_bits=(1, 2, 2, 1, 2, 1), v_bits=1, v_share_from=2, residual_length=R, eta={1: 1 / 6, 2: 0.09},
                 metadata_dtype="float8_e4m3fn"),
    XQuantConfig(k_bits=2, v_bits=1, v_share_from=2, residual_length=R, eta={1: 1 / 6, 2: 0.09}, sink_tokens=5),
    XQuantConfig(k_bits=(1, 2, 2, 1, 2, 1), v_bits=2, k_share_from=0, residual_length=R, eta={2: 0.09},
                 rotation="hadamard"),
    XQuantConfig(k_bits=2, v_bits=(1, 1, 2, 2, 1, 1), k_share_from=2, v_share_from=0, residual_length=R,
                 level_fit="lsq", metadata_dtype="float8_e4m3fn"),
    XQuantConfig(k_bits=2, v_bits=1, k_share_from=4, v_share_from=0, residual_length=R, sink_tokens=3,
                 rotation="hadamard", level_fit="lsq"),
], ids=["fp", "k2v1-calibrated", "mixed-shared", "float8-metadata", "sinks", "rotation", "lsq-shared", "all-options"])
def test_simulator_equals_decode(mini, ids, config):
    """One parallel forward gives the token-by-token decode NLL of the real cache."""
    sim = DecodeSimulator(mini, ids, prefill=P, group_size=G, residual_length=R, metadata_dtype=config.metadata_dtype)
    score = sim.score(config)
    assert score.nll == pytest.approx(_decode_nll_mean(mini, ids, config, P), rel=1e-5, abs=1e-6)
    if config.k_bits == 16:  # the reference pass; a plan pass over the decoded positions gives the same
        assert sim.run(sim.plans(config), {}).kl == pytest.approx(0.0, abs=1e-6)
        assert sim.run(sim.plans(config), {}).nll == pytest.approx(score.nll, rel=1e-6)
    else:
        assert score.kl > 0


@pytest.mark.parametrize("options", [
    QualityOptions(sink_tokens=5, rotation="hadamard", level_fit="lsq"),
    QualityOptions(sink_tokens=3, rotation="hadamard", metadata_dtype="float8_e4m3fn"),
], ids=["sinks-rotation-lsq", "sinks-rotation-minmax-float8"])
def test_plan_path_with_options_equals_decode(mini, ids, options):
    """The path the search takes, ``run(plans, eta, options=...)``, recorded and replayed from a
    layer as the sensitivities are, equals the token-by-token decode of the config it stands for
    (a simulator built without options or float8 metadata: the options come with the run)."""
    sim = DecodeSimulator(mini, ids, prefill=P, group_size=G, residual_length=R)
    eta = {} if options.level_fit == "lsq" else {1: 1 / 6, 2: 0.09}
    base = [LayerPlan(i, 2, 2) for i in range(LAYERS)]
    sim.run(base, eta, record=True, options=options)
    plans = list(base)
    plans[3] = LayerPlan(3, 2, 2, k_shares=True)  # the odd layer of pair 1 reads layer 2's key codes
    plans[4] = LayerPlan(4, 1, 2)
    config = options.apply(XQuantConfig(k_bits=(2, 2, 2, 2, 1, 2), v_bits=2, k_share_from=2, residual_length=R,
                                        eta=eta))
    assert config.resolve(LAYERS) == plans
    replayed = sim.run(plans, eta, start=2, options=options)
    assert replayed == sim.run(plans, eta, options=options) == sim.score(config)
    assert replayed.nll == pytest.approx(_decode_nll_mean(mini, ids, config, P), rel=1e-5, abs=1e-6)
    assert replayed.kl > 0 and replayed != sim.run(plans, eta)  # the options change the result
    with pytest.raises(ValueError, match="options differ from the recorded pass"):
        sim.run(plans, eta, start=2)
    with pytest.raises(ValueError, match="replaces eta"):
        sim.run(plans, {1: 1 / 6}, options=QualityOptions(level_fit="lsq"))
    with pytest.raises(ValueError, match="sink_tokens"):
        sim.run(plans, {}, options=QualityOptions(sink_tokens=R))


def test_replayed_layers_equal_a_full_pass(mini, ids):
    sim = DecodeSimulator(mini, ids, prefill=P, group_size=G, residual_length=R)
    base = [LayerPlan(i, 2, 2) for i in range(LAYERS)]
    sim.run(base, {2: 0.045}, record=True)
    for layer in (1, 4):
        plans = list(base)
        plans[layer] = LayerPlan(layer, 1, 2)
        assert sim.run(plans, {2: 0.045}, start=layer) == sim.run(plans, {2: 0.045})
    with pytest.raises(ValueError, match="differ from the recorded pass"):
        sim.run([LayerPlan(i, 1, 1) for i in range(LAYERS)], {2: 0.045}, start=3)


def test_simulator_equals_decode_on_smollm2():
    """The same on the real SmolLM2 (30 layers, GQA 9/3), presets' window, a short text."""
    from xquant_fx import smollm2

    model, tokenizer = smollm2.load(torch.float32)
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids[:, :200]
    sim = DecodeSimulator(model, ids)
    for name in ("xquant-1.38", "kivi-2"):
        config = XQuantConfig.preset(name)
        assert sim.score(config).nll == pytest.approx(_decode_nll_mean(model, ids, config, 128), rel=1e-4)


# ----------------------------------------------------------------------------- search
def test_found_configs_respect_the_budget(found):
    for result, budget in zip(found, BUDGETS):
        assert result.budget_bits == budget
        assert result.code_bits <= budget + 1e-9
        assert result.config.code_bits(LAYERS) == pytest.approx(result.code_bits)
        assert result.config.residual_length == R
        assert result.score.kl >= 0 and result.reference.kl == 0
        assert result.config.name in result.summary() and "search cost" in result.summary()


def test_higher_budget_never_scores_worse(found, mini, ids):
    kls = [r.score.kl for r in found]
    assert all(hi <= lo for lo, hi in zip(kls, kls[1:])), kls
    alone = [search(mini, b, input_ids=ids, residual_length=R, prefill=P, compare_presets=False) for b in (1.0, 2.0)]
    assert alone[1].score.kl <= alone[0].score.kl


def test_search_is_deterministic(found, mini, ids):
    again = search(mini, BUDGETS, input_ids=ids, residual_length=R, prefill=P)
    for a, b in zip(found, again):
        assert a.config == b.config
        assert a.score == b.score


def test_budget_below_minimum_raises_naming_it(mini, ids):
    assert minimum_code_bits(LAYERS) == 0.5
    with pytest.raises(ValueError, match=r"minimum .*: 0\.5000 code bits"):
        search(mini, 0.45, input_ids=ids, residual_length=R, prefill=P)
    with pytest.raises(ValueError, match=r"minimum .*: 1\.0000 code bits"):
        search(mini, 0.9, input_ids=ids, residual_length=R, prefill=P, sharing=False)
    with pytest.raises(ValueError, match="stored_budget_bits=1 is below the minimum"):
        search(mini, 1.5, input_ids=ids, residual_length=R, prefill=P, stored_budget_bits=1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        search(mini, 1.5)


def test_stored_budget_and_no_sharing(mini, ids):
    off = dict(input_ids=ids, residual_length=R, prefill=P, compare_presets=False, options="off")
    free = search(mini, 1.5, **off)
    bound = search(mini, 1.5, **off, stored_budget_bits=free.stored_bits - 0.1)
    assert bound.stored_bits <= free.stored_bits - 0.1 and bound.code_bits < free.code_bits
    plain = search(mini, 1.25, input_ids=ids, residual_length=R, prefill=P, compare_presets=False, sharing=False)
    assert not any(p.k_shares or p.v_shares for p in plain.config.resolve(LAYERS))
    assert plain.sharing.startswith("not allowed")


def test_search_with_float8_metadata(found, mini, ids):
    """Configs found for float8 metadata store it, count it in stored bits, and score as the cache
    with that metadata decodes (the simulator refuses a config with other metadata)."""
    fp8 = search(mini, 1.5, input_ids=ids, residual_length=R, prefill=P, compare_presets=False,
                 metadata_dtype="float8_e4m3fn")
    plain = found[BUDGETS.index(1.5)]
    assert fp8.config.metadata_dtype == "float8_e4m3fn" and plain.config.metadata_dtype is None
    assert fp8.stored_bits < plain.stored_bits
    assert fp8.score.nll == pytest.approx(_decode_nll_mean(mini, ids, fp8.config, P), rel=1e-5, abs=1e-6)
    # a simulator scores every config with the config's own metadata dtype, whatever it was built with
    sim = DecodeSimulator(mini, ids, prefill=P, group_size=G, residual_length=R, metadata_dtype="float8_e4m3fn")
    assert sim.score(plain.config) == plain.score
    assert sim.score(fp8.config) == fp8.score


def test_found_config_is_usable_by_the_cache_and_evaluate(found, mini, ids):
    result = found[2]
    config = result.config
    cache = XQuantCache(mini.config, config, max_cache_len=ids.shape[1] + 8)
    out = mini.generate(ids[:1], max_new_tokens=8, do_sample=False, **{cache_argument(mini): cache})
    assert out.shape == (1, ids.shape[1] + 8)
    assert cache.memory_report()["code_bits"] == pytest.approx(result.code_bits)
    # evaluate() on the calibration windows reproduces the search's own calibration perplexity
    rows = evaluate.evaluate(mini, ByteTokenizer(), ["fp16", config], calibration_text(), segments=2,
                             segment_len=160, prefill=P, depths=(), progress=False)
    assert [r.config for r in rows] == ["fp16", config.name]
    assert rows[1].code_bits == pytest.approx(result.code_bits, abs=1e-4)
    assert rows[1].ppl == pytest.approx(result.score.ppl, rel=1e-4)
    assert rows[0].ppl == pytest.approx(result.reference.ppl, rel=1e-4)


# ----------------------------------------------------------------------------- quality options
def _stored(model, config, length=8192):
    return XQuantCache(model.config, config, max_cache_len=length).memory_report(torch.bfloat16)["stored_bits"]


def test_search_picks_the_quality_options(found, mini):
    """By default the search chooses sinks, rotation and level fit (the metadata dtype too, with a
    stored budget); the config carries them, fits the budget, and the summary names them and the screen."""
    for result in found:
        cfg = result.config
        assert cfg.sink_tokens in (0, 4, 8) and cfg.rotation in (None, "hadamard") and cfg.level_fit in ("minmax", "lsq")
        assert cfg.metadata_dtype is None  # no stored budget: the model dtype costs no quality
        assert result.options == QualityOptions.of(cfg)
        assert result.code_bits <= result.budget_bits + 1e-9
        assert result.stored_bits == pytest.approx(_stored(mini, cfg))
        if cfg.level_fit == "lsq":
            assert cfg.eta == {}
        assert len(result.screen) == 3 * 2 * 2 and any(r.allocated for r in result.screen)
        assert min(result.screen, key=lambda r: r.score.kl).allocated  # the screen's best is allocated
        text = result.summary()
        assert f"options: sink_tokens={cfg.sink_tokens}, rotation={cfg.rotation}, level_fit={cfg.level_fit}" in text
        assert "option screen" in text and "sinks=8, hadamard, lsq" in text
        assert "metadata_dtype: the model dtype: no stored budget" in text
    # on this model sinks pay: the configs found keep some
    assert any(r.config.sink_tokens for r in found)


def test_search_options_under_a_stored_budget(mini, ids):
    """A stored budget that only float8 metadata reaches at the code budget: float8 is chosen, both
    budgets hold, and the model dtype was tried (verified) at the code bits it leaves."""
    budget = 1.5
    fp8_floor = _stored(mini, XQuantConfig(k_bits=2, v_bits=1, residual_length=R, metadata_dtype="float8_e4m3fn",
                                           sink_tokens=8))
    result = search(mini, budget, input_ids=ids, residual_length=R, prefill=P, compare_presets=False,
                    stored_budget_bits=fp8_floor + 0.01)
    cfg = result.config
    assert cfg.metadata_dtype == "float8_e4m3fn"
    assert result.code_bits <= budget + 1e-9 and result.stored_bits <= fp8_floor + 0.01 + 1e-9
    assert result.stored_bits == pytest.approx(_stored(mini, cfg))
    assert any(c.config.metadata_dtype is None for c in result.candidates)
    assert all(c.stored_bits <= fp8_floor + 0.01 + 1e-9 for c in result.candidates)
    assert "code bits the stored budget leaves: model dtype" in result.summary()


def test_user_fixed_options_are_kept(mini, ids):
    kw = dict(input_ids=ids, residual_length=R, prefill=P, compare_presets=False)
    fixed = search(mini, 1.25, **kw, sink_tokens=4, rotation=None, level_fit="minmax", metadata_dtype=None)
    cfg = fixed.config
    assert (cfg.sink_tokens, cfg.rotation, cfg.level_fit, cfg.metadata_dtype) == (4, None, "minmax", None)
    assert fixed.screen == [] and "options" in fixed.summary()
    assert all(how == "fixed by the caller" for how in fixed.options_how.values())
    assert all(QualityOptions.of(c.config) == QualityOptions(4) for c in fixed.candidates)
    # one option fixed, the others searched: the screen holds only combinations with it
    lsq = search(mini, 1.25, **kw, level_fit="lsq", rotation=["hadamard"])
    assert lsq.config.level_fit == "lsq" and lsq.config.eta == {} and lsq.config.rotation == "hadamard"
    assert len(lsq.screen) == 3 and all(r.options.level_fit == "lsq" and r.eta == {} for r in lsq.screen)
    assert all(c.config.level_fit == "lsq" for c in lsq.candidates)  # no eta refinement for lsq
    # given candidates are searched over
    some = search(mini, 1.25, **kw, sink_tokens=(0, 2), rotation=None, level_fit="minmax")
    assert some.config.sink_tokens in (0, 2) and len(some.screen) == 2
    with pytest.raises(ValueError, match="sink_tokens=64"):
        search(mini, 1.25, **kw, sink_tokens=R)
    with pytest.raises(ValueError, match="options='bogus'"):
        search(mini, 1.25, **kw, options="bogus")


def test_value_group_size_is_carried_and_stored_bits_count_it(mini, ids):
    """``value_group_size`` is fixed by the caller: every candidate has it, the simulator scores it
    (another score than 32-channel groups) and the stored bits are the cache's for it."""
    kw = dict(input_ids=ids, residual_length=R, prefill=P, compare_presets=False, options="off")
    wide = search(mini, 1.5, **kw, value_group_size=64, stored_budget_bits=3.0)
    assert wide.config.value_group_size == 64
    assert all(c.config.value_group_size == 64 for c in wide.candidates)
    assert wide.stored_bits == pytest.approx(_stored(mini, wide.config))
    assert wide.stored_bits < _stored(mini, wide.config.replace(value_group_size=None))
    assert "value_group_size=64" in wide.summary()
    plain = search(mini, 1.5, **kw, stored_budget_bits=3.0)
    assert plain.config.value_group_size is None
    assert wide.score != plain.score
    with pytest.raises(ValueError, match="value_group_size=48"):
        search(mini, 1.5, **kw, value_group_size=48)


def test_options_off_is_the_search_without_options(mini, ids):
    kw = dict(input_ids=ids, residual_length=R, prefill=P, compare_presets=False)
    off = search(mini, 1.25, **kw, options="off")
    assert QualityOptions.of(off.config) == QualityOptions() and off.screen == []
    assert "off (options='off')" in off.summary()
    explicit = search(mini, 1.25, **kw, sink_tokens=0, rotation=None, level_fit="minmax", metadata_dtype=None)
    assert explicit.config == off.config and explicit.score == off.score
    # "off" leaves given options alone
    assert search(mini, 1.25, **kw, options="off", sink_tokens=4).config.sink_tokens == 4


def test_rotation_is_not_chosen_for_non_power_of_two_head_dims():
    model = mini_model("llama", num_hidden_layers=4, head_dim=96)
    ids = ByteTokenizer()(calibration_text()).input_ids[0, :160].view(1, 160)
    kw = dict(input_ids=ids, residual_length=R, prefill=P, compare_presets=False)
    result = search(model, 1.5, **{**kw, "compare_presets": True}, sink_tokens=(0, 4))
    assert result.config.rotation is None
    assert result.presets and all(c.config.rotation is None for c in result.presets)  # rotated presets left out
    assert all(r.options.rotation is None for r in result.screen) and len(result.screen) == 4
    assert "hadamard skipped: head dims (96, 96) are not powers of two" in result.summary()
    with pytest.raises(ValueError, match="power-of-two head dims"):
        search(model, 1.5, **kw, rotation="hadamard")


def test_sinks_that_do_not_fit_the_stored_budget_are_not_chosen(mini, ids):
    """At 256 stored tokens a sink costs 1/16 bit per value: a stored budget just above the
    smallest config without sinks leaves no room for any."""
    kw = dict(input_ids=ids, residual_length=R, prefill=P, compare_presets=False, stored_len=256,
              metadata_dtype=None, rotation=None, level_fit="minmax")
    floor = _stored(mini, XQuantConfig(k_bits=1, v_bits=1, k_share_from=0, v_share_from=0, residual_length=R), 256)
    with_4 = _stored(mini, XQuantConfig(k_bits=1, v_bits=1, k_share_from=0, v_share_from=0, residual_length=R,
                                        sink_tokens=4), 256)
    assert with_4 > floor + 0.2
    result = search(mini, 0.75, **kw, stored_budget_bits=floor + 0.01)
    assert result.config.sink_tokens == 0 and result.stored_bits <= floor + 0.01 + 1e-9
    assert "4, 8 dropped: no config with them fits the stored budget" in result.summary()
    # room for 4 sinks but not 8: 8 is dropped, and a config with sinks pays for them in code bits
    roomy = search(mini, 2.0, **kw, stored_budget_bits=with_4 + 0.01)
    assert roomy.config.sink_tokens in (0, 4) and roomy.stored_bits <= with_4 + 0.01 + 1e-9
    assert "8 dropped" in roomy.summary()


# ----------------------------------------------------------------------------- sharing
def _synthetic(share_cost: float, layers: int = 4) -> Sensitivity:
    """Every 2 -> 1 bit change costs 0.01; sharing a pair costs ``share_cost`` at 2 bits."""
    sens = Sensitivity(base_bits=2, base=Score(kl=0.1, nll=1.0), eta={})
    for layer in range(layers):
        for kind in "kv":
            sens.layer[(layer, kind, 1)] = 0.01
    for pair in range(layers // 2):
        for kind in "kv":
            sens.shared[(pair, kind, 2)] = share_cost
            sens.shared[(pair, kind, 1)] = 0.02 + share_cost
    return sens


def test_allocation_shares_only_when_it_costs_less_per_bit():
    # 10 of 16 code bits: six tensors must lose a bit, or three pairs share at 2 bits.
    costly = allocate(_synthetic(share_cost=0.05), 4, 10, (1, 2), mode="both")
    assert costly.k_share_from is None and costly.v_share_from is None
    assert sorted(costly.k_bits + costly.v_bits).count(1) == 6
    assert costly.predicted_increase == pytest.approx(0.06)
    cheap = allocate(_synthetic(share_cost=0.001), 4, 10, (1, 2), mode="both")
    assert cheap.k_share_from is not None or cheap.v_share_from is not None
    assert cheap.predicted_increase < 0.06
    config = XQuantConfig(k_bits=cheap.k_bits, v_bits=cheap.v_bits, k_share_from=cheap.k_share_from,
                          v_share_from=cheap.v_share_from)
    assert config.code_bits(4) * 8 == cheap.code_total <= 10
    rates = sharing_rates(_synthetic(share_cost=0.05), 4, (1, 2))
    assert rates["k"] == pytest.approx((0.025, 0.01))
    assert allocate(_synthetic(0.05), 4, 3, (1, 2), mode="none") is None  # below 8 bits only sharing fits


def test_allocation_spends_the_budget_despite_negative_measurements():
    """A layer measured better at one bit than at two (noise) does not make the allocation leave
    code bits unspent: fewer bits never predict a lower KL, and equal predictions take more bits."""
    sens = _synthetic(share_cost=0.05)
    sens.layer[(1, "k", 1)] = -0.003
    sens.layer[(2, "v", 1)] = -0.001
    alloc = allocate(sens, 4, 15, (1, 2), mode="both")
    assert alloc.code_total == 15 and alloc.predicted_increase == pytest.approx(0.0)
    assert alloc.k_bits[1] == 1 or alloc.v_bits[2] == 1  # the one bit to drop goes to a "free" tensor
    assert allocate(sens, 4, 16, (1, 2), mode="none").code_total == 16


def test_search_reports_its_sharing_decision(found):
    for result in found:
        assert result.sharing.split(":")[0].split(",")[0] in ("used", "not used")
        uses = any(p.k_shares or p.v_shares for p in result.config.resolve(LAYERS))
        if result.sharing.startswith("not used"):
            assert not uses
    # below one code bit only sharing reaches the budget, and the report says so
    assert found[0].sharing.startswith("used, and required")
    assert any(p.k_shares or p.v_shares for p in found[0].config.resolve(LAYERS))


# ----------------------------------------------------------------------------- text and CLI
def test_calibration_text_is_disjoint_from_the_evaluation_corpus():
    text = calibration_text()
    check_disjoint(text, evaluate.default_corpus())
    with pytest.raises(ValueError, match="overlaps the evaluation text"):
        check_disjoint(text, "preamble\n" + text[1000:3000])


def test_copy_windows_repeat_their_first_half():
    """``copy_windows``: after the text windows, windows of the next ``tokens / 2`` tokens twice
    (the copy reads its source ``tokens / 2`` back, past the window); refused where the copy
    would still read full-precision keys, or the text is too short."""
    from xquant_fx.config_search.entry import _calibration_ids

    text = ByteTokenizer()(calibration_text()).input_ids[0]
    ids, described = _calibration_ids(ByteTokenizer(), None, None, 160, 1, copy_windows=2, residual_length=R)
    assert ids.shape == (3, 160) and torch.equal(ids[0], text[:160])
    assert torch.equal(ids[1], torch.cat([text[160:240], text[160:240]]))
    assert torch.equal(ids[2], torch.cat([text[240:320], text[240:320]]))
    assert "then 2 copy window(s) of the next 80 tokens twice" in described
    assert _calibration_ids(ByteTokenizer(), None, None, 160, 2, copy_windows=0)[0].shape == (2, 160)
    with pytest.raises(ValueError, match="half exceeds residual_length=128"):
        _calibration_ids(ByteTokenizer(), None, None, 160, 1, copy_windows=1, residual_length=128)
    with pytest.raises(ValueError, match="even window"):
        _calibration_ids(ByteTokenizer(), None, None, 161, 1, copy_windows=1, residual_length=R)
    with pytest.raises(ValueError, match="for the copy windows"):
        _calibration_ids(ByteTokenizer(), "short text " * 20, None, 160, 1, copy_windows=1, residual_length=R)
    with pytest.raises(ValueError, match="copy_windows=-1"):
        _calibration_ids(ByteTokenizer(), None, None, 160, 1, copy_windows=-1)
    given = text[:320].view(2, 160)  # 2-D ids are used as given
    assert torch.equal(_calibration_ids(None, None, given, 160, 1, copy_windows=1, residual_length=R)[0], given)


def test_eval_command_searches_and_evaluates(tmp_path, monkeypatch, capsys):
    from xquant_fx import smollm2

    model = mini_model("llama", num_hidden_layers=4)
    monkeypatch.setattr(smollm2, "load", lambda dtype=None: (model, ByteTokenizer()))
    args = ["eval", "--presets", "fp16", "kivi-2", "--segments", "1", "--segment-len", "160", "--prefill", "64",
            "--depths", "--search", "1.25,1.5", "--search-tokens", "160", "--search-copy-windows", "0",
            "--out", str(tmp_path)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "search-1.25" in out and "search-1.5" in out and "verified candidates" in out
    lines = (tmp_path / "eval.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["fp16", "kivi-2", "search-1.25", "search-1.5"]
    assert "Calibration text" in (tmp_path / "search.md").read_text()
    assert cli_main(["eval", "--search", "0.1", "--out", str(tmp_path)]) == 2
    assert "below the minimum" in capsys.readouterr().err


@pytest.mark.parametrize("flag, expected", [([], "search"), (["--search-metadata-dtype", "model"], None),
                                            (["--search-metadata-dtype", "float8_e4m3fn"], "float8_e4m3fn")])
def test_eval_command_searches_the_metadata_dtype_by_default(tmp_path, monkeypatch, flag, expected):
    """``eval --search`` leaves the metadata dtype to the search (float8 tried under a stored budget)
    unless the command fixes it."""
    from xquant_fx import config_search, smollm2

    model = mini_model("llama", num_hidden_layers=2)
    monkeypatch.setattr(smollm2, "load", lambda dtype=None: (model, ByteTokenizer()))
    seen = {}
    monkeypatch.setattr(config_search, "search", lambda *args, **kwargs: seen.update(kwargs) or [])
    monkeypatch.setattr(config_search, "format_results", lambda found: "")
    args = ["eval", "--presets", "fp16", "--segments", "1", "--segment-len", "160", "--prefill", "64", "--depths",
            "--search", "1.4", "--search-stored", "2.1", "--out", str(tmp_path), *flag]
    assert cli_main(args) == 0
    assert seen["metadata_dtype"] == expected and seen["stored_budget_bits"] == 2.1


def test_quality_pipeline_on_a_second_family(tmp_path, monkeypatch, capsys):
    """The quality pipeline on Qwen3 (per-head q/k norms, another attention module), in a smoke
    form: the full-precision preset scores exactly what the model gives without a cache, and the
    eval command runs the recommended presets (sinks, rotation) and a search that may pick every
    option under a code and a stored budget."""
    from xquant_fx import XQuantConfig, smollm2

    model = mini_model("qwen3", num_hidden_layers=3)
    ids = ByteTokenizer()(calibration_text()).input_ids[0, : 2 * 96].view(2, 96)
    nll, _ = evaluate.decode_nll(model, ids, XQuantConfig.preset("fp16"), prefill=32)
    with torch.no_grad():
        logits = model(ids).logits[:, 31:-1].float()
    plain = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 32:], reduction="none")
    torch.testing.assert_close(nll, plain, rtol=1e-4, atol=1e-4)

    monkeypatch.setattr(smollm2, "load", lambda dtype=None: (model, ByteTokenizer()))
    args = ["eval", "--presets", "fp16", "kivi-2+", "xquant-1.38+", "--segments", "1", "--segment-len", "160",
            "--prefill", "64", "--depths", "--search", "1.4", "--search-stored", "2.5", "--search-tokens", "160",
            "--search-copy-windows", "0", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    header, *lines = (tmp_path / "eval.csv").read_text().splitlines()
    header = header.split(",")
    rows = {line.split(",")[0]: line.split(",") for line in lines}
    names = list(rows)
    assert names[:3] == ["fp16", "kivi-2+", "xquant-1.38+"] and names[3].startswith("search-1.4")
    ppl = {name: float(row[header.index("ppl")]) for name, row in rows.items()}
    assert all(math.isfinite(p) and p > 1 for p in ppl.values())
    assert float(rows[names[3]][header.index("code_bits")]) <= 1.4
    assert float(rows[names[3]][header.index("stored_bits")]) <= 2.5
