"""Config search: per-layer key/value bits, cross-layer sharing and eta under a code-bit budget.

``search(model, budget_bits=1.4, tokenizer=tok)`` returns the :class:`XQuantConfig` it found for
that model, with a readable report (:meth:`SearchResult.summary`): bits and sharing per layer, eta,
code and stored bits, and the decode-condition perplexity and KL on the calibration text next to
full precision and the presets.

What it measures, and why
-------------------------
A quantized cache only changes what a prediction sees of tokens older than the full-precision
window, so quality has to be measured *under decode conditions*: each prediction sees the past as
generation leaves it (:mod:`xquant_fx.evaluate`). Done token by token that costs one model call
per token per candidate: 30 to 60 s per candidate for SmolLM2 on a CPU, far too slow to compare
hundreds of candidates. :class:`DecodeSimulator` computes the same numbers in **one parallel
forward per candidate**: every layer keeps two versions of each key and value, exact and as read
back from codes (fake-quantized with :mod:`xquant_fx.quant`, the cache's own math, codes of a
sharing layer taken from its partner's keys/values), and the attention of the query at position
``t`` takes codes for keys below ``Nk(t+1)`` and values below ``Nv(t+1)``, the exact keys and
values above: the cache's own boundaries after storing ``t + 1`` tokens. Every later position's
hidden states are computed from those attention outputs, as in decode, so the logits equal those
of the real :class:`XQuantCache` up to float rounding (tested against ``evaluate.decode_nll``).
Two more savings, both exact: the first ``prefill - 1`` positions never see a quantized token, so
their keys and values are computed once; and a candidate that differs from a recorded pass only
from layer ``l`` on replays the recorded outputs of layers ``< l``.

The objective is the mean KL divergence of the next-token distributions from the full-precision
cache's (nats per token): unlike perplexity it never rewards an error that happens to help the
text, and on a few hundred tokens it is far less noisy. Perplexity is reported beside it.

The search
----------
1. **eta** per bit width, by grid (the paper's grid, plus 1/4 for one bit): ``eta_2`` on the
   all-2-bit cache, ``eta_1`` on the all-1-bit cache.
2. **Sensitivities**, one change at a time from the all-2-bit cache (calibrated): each layer's keys,
   then values, at each other width; and for each layer pair (2j, 2j+1) and tensor, the pair at
   each width with the odd layer reading the even layer's codes. ``2 L (|bits| - 1) + L |bits|``
   forwards for ``L`` layers.
3. **Allocation** (exact knapsack over the additive estimate): the config can share only from a
   start layer on (``k_share_from`` / ``v_share_from``: odd layers at or after it share when their
   bits equal their partner's), so for each tensor and each start, a dynamic program over layer
   pairs picks every pair's bits (and with it whether it shares) for each total of code bits;
   keys and values are then combined under the budget. It is done four times: no sharing, keys
   only, values only, both.
4. **Verification**: the best allocation of each of the four is scored for real (the estimate is
   additive, errors are not); the best verified one wins, then eta is refined on it by coordinate
   search over the grid. A config with sharing is returned only when it verified better than the
   best without, and the report (:attr:`SearchResult.sharing`) says which won, by how much, and
   what sharing a pair costs per saved bit against lowering its bits: cross-layer sharing is not
   free on every model. On SmolLM2, sharing values costs more per saved bit than lowering them to
   one bit (median 0.0059 against 0.0042 nats of KL per bit), sharing keys less (0.017 against
   0.026); the verified winners at 1.25 to 1.5 code bits share keys or values in a few pairs only.
5. Budgets requested in one call are solved from the smallest up, and a larger budget never
   returns a config that scores worse than a smaller budget's (it falls back to that one).

What it does not search: the metadata dtype (``metadata_dtype=`` is given, and the search
simulates and counts it), the group size and the full-precision window (they change stored bits,
not code bits: a longer window would buy quality with bytes the code-bit budget does not count;
give a ``stored_budget_bits`` to bound those bytes too), 16-bit tensors (14 extra bits each) and,
by default, 4-bit tensors (``bits=(1, 2, 4)`` adds them; on SmolLM2 no layer gained measurably from
4 over 2 bits). One eta per bit width serves keys and values alike, as the config stores it.
Sharing can only start at a layer and run to the end (the config's ``*_share_from``), so inside
that range a pair with equal bits must share; the allocation works within that rule. Models with
sliding-window layers are refused.

Cost on SmolLM2-135M (30 layers, one 384-token calibration window, 256 positions scored, fp32):
161 forwards for three budgets in one call (2 reference/base, 7 eta, 120 sensitivities, 4
verifications and up to 5 eta trials per budget, 5 presets), 143 s on one thread of a 2-core Xeon
shared with other jobs (0.5 to 0.9 s a forward); the sensitivities are three quarters of it.
Decoding the same 256 positions token by token through the cache costs 30 to 60 s per candidate.
``SearchResult.seconds`` and ``forwards`` record a run's own cost; ``tokens`` trades cost for a
longer calibration context.

The default calibration text (:func:`calibration_text`) is the module docstrings of standard-library
modules that the evaluation corpus of :mod:`xquant_fx.evaluate` does not use, so a searched config
is never evaluated on the text it was chosen on (:func:`check_disjoint`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from . import quant
from .cache import XQuantCache, kv_geometry, layer_types
from .config import FULL_PRECISION, QUANT_BITS, LayerPlan, XQuantConfig

logger = logging.getLogger(__name__)

# Calibration text: module docstrings of standard-library modules that the evaluation corpus
# (CPython's LICENSE and the docstrings of evaluate._DOC_MODULES) does not use.
CALIBRATION_MODULES = ("csv", "heapq", "cmd", "pdb", "configparser", "statistics", "wave")

# Calibration grids: the paper's (eta_1 in {0, 1/6, 1/3}, eta_2 in {0, 0.045, 0.09}), plus 1/4 for
# one bit (the midpoint reconstruction of a uniform group's halves).
DEFAULT_ETA_GRID = {1: (0.0, 1 / 6, 1 / 4, 1 / 3), 2: (0.0, 0.045, 0.09)}

_KINDS = ("k", "v")
_MODES = ("none", "keys", "values", "both")


def calibration_text() -> str:
    """The default calibration text: the docstrings of :data:`CALIBRATION_MODULES`, in order."""
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in CALIBRATION_MODULES)


def check_disjoint(calibration: str, evaluation: str, min_chars: int = 40, min_words: int = 6) -> None:
    """Raise ``ValueError`` if a line of the calibration text (stripped, of at least ``min_chars``
    characters and ``min_words`` words: rules such as ``-----`` do not count) occurs in the evaluation
    text: a config must not be scored on the text it was chosen on."""
    for line in calibration.splitlines():
        line = line.strip()
        if len(line) >= min_chars and len(line.split()) >= min_words and line in evaluation:
            raise ValueError(f"the calibration text overlaps the evaluation text, e.g. {line[:80]!r}: "
                             "choose a calibration text disjoint from the evaluation corpus")


# ============================================================================ simulator
_ATTN_NAME = "xquant_search"
_ACTIVE: list["DecodeSimulator"] = []  # the simulator whose forward is running


def _attention_entry(module, query, key, value, attention_mask, **kwargs):
    if not _ACTIVE:
        raise RuntimeError(f"the {_ATTN_NAME!r} attention only runs inside a DecodeSimulator pass")
    return _ACTIVE[-1].attend(module, query, key, value, **kwargs)


def _decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    num_layers = kv_geometry(model.config)[0]
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != num_layers:
        raise ValueError(
            f"{type(model).__name__}: cannot find its {num_layers} decoder layers as `get_decoder().layers`; "
            "the search supports transformers decoder-only models built that way (Llama, Mistral, Qwen, ...)"
        )
    return layers


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer whose output is already known: returns it without computing."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@dataclass(frozen=True)
class Score:
    """Decode-condition quality of one cache plan on the calibration text: ``kl`` is the mean
    KL(full precision || plan) of the next-token distributions in nats per token, ``nll`` the
    mean negative log-likelihood of the text (``ppl = exp(nll)``)."""

    kl: float
    nll: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


class DecodeSimulator:
    """Decode-condition scores of cache plans on fixed text, one parallel forward per plan.

    Args:
        model: a transformers decoder-only causal LM (left unchanged: its attention implementation
            is switched only for the duration of each pass).
        ids: token ids ``[segments, length]``; each row is scored like one sequence of
            ``evaluate.decode_nll``: ``prefill`` tokens prefilled, every later token decoded.
        prefill: at most ``residual_length`` (default: ``residual_length``).
        group_size, residual_length: G and R of the configs it will score.

    ``run(plans, eta)`` scores one per-layer plan (any plan, including sharing patterns a config
    cannot express) and returns a :class:`Score`; the module docstring says how and why it equals
    the cache's decode. ``score(config)`` also applies the config's ``sink_tokens``, ``rotation``
    and ``level_fit`` as the cache does (the search itself leaves them off).
    """

    def __init__(self, model, ids: torch.Tensor, prefill: int | None = None, group_size: int = 32,
                 residual_length: int = 128, metadata_dtype: str | None = None):
        if ids.dim() != 2:
            raise ValueError(f"ids must be [segments, tokens], got shape {tuple(ids.shape)}")
        from transformers import AttentionInterface

        AttentionInterface.register(_ATTN_NAME, _attention_entry)
        self.model = model
        self.layers = _decoder_layers(model)
        self.num_layers = len(self.layers)
        self.G, self.R = group_size, residual_length
        self.metadata_dtype = XQuantConfig(metadata_dtype=metadata_dtype).metadata_dtype  # validated
        segments, length = ids.shape
        prefill = residual_length if prefill is None else prefill
        if not 1 <= prefill <= min(residual_length, length - 1):
            raise ValueError(f"prefill={prefill} must be in [1, min(residual_length={residual_length}, "
                             f"segment length - 1 = {length - 1})]")
        if length <= residual_length + 1:
            raise ValueError(
                f"segments of {length} tokens never leave the {residual_length}-token full-precision window: "
                "nothing would be quantized; use longer segments"
            )
        self.ids = ids.to(model.device)
        self.P = prefill
        _, sliding = _num_layers_and_sliding(model, length)
        if any(sliding):
            raise ValueError(f"{type(model).__name__} has sliding-window layers ({sum(sliding)} of {self.num_layers}): "
                             "the decode simulator (and the search) support full-attention models only")
        self.forwards = 0
        self._plans: list[LayerPlan] = []
        self._eta: dict[int, float] = {}
        # (sink_tokens, rotation, level_fit) of the config being scored; the search's runs keep the defaults.
        self._options: tuple[int, str | None, str] = (0, None, "minmax")
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._recorded: dict | None = None
        # Reference pass, full precision over the whole text: keeps the keys and values of the first
        # P - 1 positions (no plan changes them) and the reference next-token distributions.
        logits = self._forward(self.full_precision_plans(), {}, self.ids[:, :-1], 0, None, False, prefix=True)
        self.ref_logp = torch.log_softmax(logits[:, self.P - 1 :].float(), -1)  # [S, n, V]
        self.ref_p = self.ref_logp.exp()
        self.targets = self.ids[:, self.P :]
        self.reference = replace(self._score(logits[:, self.P - 1 :]), kl=0.0)

    @property
    def scored_tokens(self) -> int:
        return self.targets.numel()

    def full_precision_plans(self) -> list[LayerPlan]:
        return [LayerPlan(i, FULL_PRECISION, FULL_PRECISION) for i in range(self.num_layers)]

    def plans(self, config: XQuantConfig) -> list[LayerPlan]:
        """The per-layer plan of ``config`` on this model, as the cache resolves it."""
        if (config.group_size, config.residual_length, config.metadata_dtype) != (self.G, self.R, self.metadata_dtype):
            raise ValueError(f"config {config.name!r} has group_size={config.group_size}, residual_length="
                             f"{config.residual_length}, metadata_dtype={config.metadata_dtype}; this simulator was "
                             f"built for {self.G}, {self.R} and {self.metadata_dtype}")
        return config.resolve(self.num_layers)

    def score(self, config: XQuantConfig) -> Score:
        plans = self.plans(config)
        if all(p.k_bits == FULL_PRECISION and p.v_bits == FULL_PRECISION for p in plans):
            return self.reference  # the reference pass is this plan
        self._options = (config.sink_tokens, config.rotation, config.level_fit)
        try:
            return self.run(plans, config.eta)
        finally:
            self._options = (0, None, "minmax")

    def run(self, plans: list[LayerPlan], eta: dict[int, float], start: int = 0, record: bool = False) -> Score:
        """Score ``plans`` (one :class:`LayerPlan` per layer) with calibration ``eta``.

        ``record=True`` keeps this pass's layer outputs; ``start=l`` then reuses that recorded pass
        for layers ``< l``, whose plans and eta must be the recorded pass's (checked)."""
        if len(plans) != self.num_layers:
            raise ValueError(f"{len(plans)} plans for a model with {self.num_layers} layers")
        recorded = None
        if start:
            recorded = self._recorded
            if recorded is None:
                raise RuntimeError("run(start > 0) needs a recorded pass first (record=True)")
            if plans[:start] != recorded["plans"][:start] or eta != recorded["eta"]:
                raise ValueError(f"run(start={start}): the plans below layer {start} or eta differ from the recorded pass")
        logits = self._forward(plans, eta, self.ids[:, self.P - 1 : -1], start, recorded, record)
        return self._score(logits)

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def _attention_swapped(self):
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_ATTN_NAME)
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.pop()
            self.model.set_attn_implementation(previous)

    def _forward(self, plans, eta, ids, start, recorded, record, prefix=False):
        """Logits ``[S, n, V]`` of ``ids`` at positions ``P - 1 ...`` (``0 ...`` with ``prefix``)."""
        self._plans, self._eta, self._prefix_pass = plans, dict(eta), prefix
        self._kv = dict(recorded["kv"]) if recorded else {}
        outputs, hooks, saved = {}, [], {}
        if record:
            for i, layer in enumerate(self.layers):
                hooks.append(layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out)))
        for i in range(start):
            saved[i] = self.layers[i]
            self.layers[i] = _Replay(recorded["outputs"][i])
        offset = 0 if prefix else self.P - 1
        s, n = ids.shape
        position_ids = torch.arange(offset, offset + n, device=ids.device)[None].expand(s, n)
        no_mask = torch.zeros(s, 1, n, n, device=ids.device)  # a 4D mask: transformers builds none (unused)
        try:
            with torch.no_grad(), self._attention_swapped():
                out = self.model(input_ids=ids, position_ids=position_ids, attention_mask=no_mask, use_cache=False)
        finally:
            for i, layer in saved.items():
                self.layers[i] = layer
            for h in hooks:
                h.remove()
        self.forwards += 1
        if record:
            for i in range(start):
                outputs[i] = recorded["outputs"][i]
            self._recorded = {"outputs": outputs, "kv": dict(self._kv), "plans": list(plans), "eta": dict(eta)}
        return out.logits

    def _score(self, logits: torch.Tensor) -> Score:
        """KL(reference || softmax(logits)) and NLL of the targets, from logits ``[S, n, V]``."""
        logq = torch.log_softmax(logits.float(), -1)
        kl = torch.linalg.vecdot(self.ref_p, self.ref_logp - logq).mean()
        nll = -logq.gather(-1, self.targets[..., None]).mean()
        return Score(kl=max(kl.item(), 0.0), nll=nll.item())

    # ------------------------------------------------------------------ attention
    def attend(self, module, query, key, value, scaling=None, softcap=None, **kwargs):
        """Attention of ``query`` over the cache as decode leaves it (see the module docstring)."""
        if kwargs.get("s_aux") is not None:
            raise ValueError(f"{type(module).__name__} uses attention sinks: the search does not model them")
        layer = module.layer_idx
        plan = self._plans[layer]
        if self._prefix_pass:
            self._prefix[layer] = (key[:, :, : self.P - 1], value[:, :, : self.P - 1])
            k_all, v_all = key, value
        else:
            pk, pv = self._prefix[layer]
            k_all, v_all = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        self._kv[layer] = (k_all, v_all)
        b, hq, nq, d = query.shape
        hkv, nk = k_all.shape[1], k_all.shape[2]
        rep = hq // hkv
        G, R = self.G, self.R
        n = torch.arange(nk - nq, nk, device=query.device) + 1  # tokens stored when each query attends
        j = torch.arange(nk, device=query.device)
        # GQA: the query heads of one KV head become extra rows, [b, hkv, rep * nq, d]
        q = query.float().reshape(b, hkv, rep * nq, d) * (scaling if scaling is not None else d ** -0.5)
        scores = (q @ k_all.float().transpose(-1, -2)).view(b, hkv, rep, nq, nk)
        if plan.k_bits != FULL_PRECISION:
            kq = self._read_back(layer, plan, k_all, "k")
            coded = kq.shape[2]
            if coded:
                sq = (q @ kq.transpose(-1, -2)).view(b, hkv, rep, nq, coded)
                use_q = j[:coded][None] < quant.key_boundary(n, R, G)[:, None]  # [nq, coded]
                scores[..., :coded] = torch.where(use_q, sq, scores[..., :coded])
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = j[None] < n[:, None]
        weights = torch.softmax(scores.masked_fill_(~visible, float("-inf")), -1)
        out = weights.view(b, hkv, rep * nq, nk) @ v_all.float()
        if plan.v_bits != FULL_PRECISION:
            # values below Nv(n) come from codes: add their weights times (read back - exact)
            delta = self._read_back(layer, plan, v_all, "v") - v_all.float()
            from_codes = j[None] < quant.value_boundary(n, R)[:, None]
            out += (weights * from_codes).view(b, hkv, rep * nq, nk) @ delta
        return out.view(b, hq, nq, -1).transpose(1, 2).contiguous().to(query.dtype), None

    def _read_back(self, layer: int, plan: LayerPlan, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``x`` as the cache reads it back from codes (keys: whole groups only), float32."""
        G = self.G
        sinks, rotation, fit = self._options
        bits = plan.k_bits if kind == "k" else plan.v_bits
        shares = plan.k_shares if kind == "k" else plan.v_shares
        eta = float(self._eta.get(bits, 0.0))
        if kind == "k":
            x = x[:, :, : (x.shape[2] // G) * G]
            quantize, dequantize = quant.quantize_keys, quant.dequantize_keys
        else:
            quantize, dequantize = quant.quantize_values, quant.dequantize_values
        rotate = quant.hadamard if rotation else (lambda t: t)  # its own inverse

        def grouped(t):  # what the cache quantizes: with sinks, key groups see position S in their place
            if sinks and kind == "k" and t.shape[2] > sinks:
                return torch.cat([t[:, :, sinks : sinks + 1].expand(-1, -1, sinks, -1), t[:, :, sinks:]], 2)
            return t

        x = rotate(x)  # the domain the cache stores
        codes, scale, zero = quantize(grouped(x), bits, G, eta, fit)
        if shares:  # the odd layer's own scale and zero point, its partner's codes
            partner = rotate(self._kv[layer - 1][0 if kind == "k" else 1][:, :, : x.shape[2]])
            codes = quantize(grouped(partner), bits, G, 0.0, fit)[0]
            if fit == "lsq":
                scale, zero = quantize(grouped(x), bits, G, 0.0, fit, codes)[1:]
        # scale and zero point stored as the cache stores them: the activation dtype or metadata_dtype
        md = quant.metadata_dtype(self.metadata_dtype, x.dtype)
        out = dequantize(codes, quant.to_metadata(scale, md), quant.to_metadata(zero, md), G).to(x.dtype)
        if sinks:
            out = torch.cat([x[:, :, :sinks], out[:, :, sinks:]], 2)[:, :, : out.shape[2]]
        return rotate(out).float()


# ============================================================================ sensitivities
@dataclass
class Sensitivity:
    """KL increase over the base cache (every tensor at ``base_bits``, no sharing) of one change.

    ``layer[(l, kind, bits)]``: layer ``l``'s keys (``kind="k"``) or values at ``bits``;
    ``shared[(j, kind, bits)]``: pair (2j, 2j+1) at ``bits``, the odd layer reading the even one's codes.
    """

    base_bits: int
    base: Score
    eta: dict[int, float]
    layer: dict[tuple[int, str, int], float] = field(default_factory=dict)
    shared: dict[tuple[int, str, int], float] = field(default_factory=dict)

    def of_layer(self, index: int, kind: str, bits: int) -> float:
        return 0.0 if bits == self.base_bits else self.layer[(index, kind, bits)]


def _plan_with(plans: list[LayerPlan], index: int, **changes) -> list[LayerPlan]:
    out = list(plans)
    out[index] = replace(out[index], **changes)
    return out


def measure_sensitivity(sim: DecodeSimulator, bits: Sequence[int], eta: dict[int, float], base_bits: int,
                        sharing: bool = True, progress: bool = False) -> Sensitivity:
    """One-change-at-a-time KL increases from the all-``base_bits`` cache (see :class:`Sensitivity`)."""
    L = sim.num_layers
    base_plans = [LayerPlan(i, base_bits, base_bits) for i in range(L)]
    base = sim.run(base_plans, eta, record=True)
    sens = Sensitivity(base_bits=base_bits, base=base, eta=dict(eta))
    jobs = []
    for layer in range(L):
        for kind in _KINDS:
            for b in bits:
                if b != base_bits:
                    jobs.append(("layer", layer, kind, b))
    if sharing:
        for pair in range(L // 2):
            for kind in _KINDS:
                for b in bits:
                    jobs.append(("shared", pair, kind, b))
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="sensitivities", leave=False)
    for what, index, kind, b in jobs:
        if what == "layer":
            plans = _plan_with(base_plans, index, **{f"{kind}_bits": b})
            sens.layer[(index, kind, b)] = sim.run(plans, eta, start=index).kl - base.kl
        else:
            even, odd = 2 * index, 2 * index + 1
            plans = _plan_with(base_plans, even, **{f"{kind}_bits": b})
            plans = _plan_with(plans, odd, **{f"{kind}_bits": b, f"{kind}_shares": True})
            start = odd if b == base_bits else even
            sens.shared[(index, kind, b)] = sim.run(plans, eta, start=start).kl - base.kl
    return sens


# ============================================================================ allocation
@dataclass(frozen=True)
class Allocation:
    """Per-layer bits and sharing starts of one tensor kind, or of a whole config."""

    k_bits: tuple[int, ...]
    v_bits: tuple[int, ...]
    k_share_from: int | None
    v_share_from: int | None
    code_total: int  # code bits summed over layers and K/V (code_bits = code_total / (2 L))
    predicted_increase: float  # sum of the chosen changes' sensitivities

    def config(self, eta: dict[int, float], group_size: int, residual_length: int, name: str,
               metadata_dtype: str | None = None) -> XQuantConfig:
        return XQuantConfig(k_bits=self.k_bits, v_bits=self.v_bits, k_share_from=self.k_share_from,
                            v_share_from=self.v_share_from, eta=dict(eta), group_size=group_size,
                            residual_length=residual_length, name=name, metadata_dtype=metadata_dtype)

    @property
    def shares(self) -> bool:
        return self.k_share_from is not None or self.v_share_from is not None


def _kind_tables(sens: Sensitivity, kind: str, num_layers: int, bits: Sequence[int], starts: Sequence[int | None]):
    """For each sharing start pair (``None``: no sharing), the exact knapsack over layer pairs:
    ``{code bits of this kind: (increase, bits per layer)}``; the best over the starts per total."""
    pairs = num_layers // 2
    best: dict[int, tuple[float, tuple[int, ...], int | None]] = {}
    for start in starts:
        table: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
        for j in range(pairs):
            even, odd = 2 * j, 2 * j + 1
            options = []
            can_share = start is not None and j >= start
            for be in bits:
                for bo in bits:
                    if can_share and be == bo:  # equal bits in the sharing range: the odd layer shares
                        options.append((be, sens.shared[(j, kind, be)], (be, bo)))
                    else:
                        options.append((be + bo, sens.of_layer(even, kind, be) + sens.of_layer(odd, kind, bo), (be, bo)))
            table = _knapsack_step(table, options)
        if num_layers % 2:
            last = num_layers - 1
            table = _knapsack_step(table, [(b, sens.of_layer(last, kind, b), (b,)) for b in bits])
        for cost, (inc, layer_bits) in table.items():
            if cost not in best or inc < best[cost][0] - 1e-12:
                best[cost] = (inc, layer_bits, None if start is None else 2 * start)
    return best


def _knapsack_step(table, options):
    out: dict[int, tuple[float, tuple[int, ...]]] = {}
    for cost, (inc, chosen) in sorted(table.items()):
        for c, d, layer_bits in options:
            key, value = cost + c, inc + d
            if key not in out or value < out[key][0] - 1e-12:
                out[key] = (value, chosen + layer_bits)
    return out


def allocate(sens: Sensitivity, num_layers: int, code_total: int, bits: Sequence[int], mode: str = "both"
             ) -> Allocation | None:
    """The allocation with the least predicted KL increase whose code bits sum to at most
    ``code_total`` (over layers and K/V), sharing as ``mode`` allows (``none``, ``keys``,
    ``values``, ``both``); ``None`` if no allocation fits."""
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: one of {_MODES}")
    all_starts = [None] + list(range(num_layers // 2))
    k_starts = all_starts if mode in ("keys", "both") else [None]
    v_starts = all_starts if mode in ("values", "both") else [None]
    k_table = _kind_tables(sens, "k", num_layers, bits, k_starts)
    v_table = _kind_tables(sens, "v", num_layers, bits, v_starts)
    best = None
    for ck, (ik, kb, ks) in sorted(k_table.items()):
        for cv, (iv, vb, vs) in sorted(v_table.items()):
            if ck + cv <= code_total and (best is None or ik + iv < best[0] - 1e-12):
                best = (ik + iv, ck + cv, kb, vb, ks, vs)
    if best is None:
        return None
    inc, total, kb, vb, ks, vs = best
    return Allocation(k_bits=kb, v_bits=vb, k_share_from=ks, v_share_from=vs, code_total=total,
                      predicted_increase=inc)


def sharing_rates(sens: Sensitivity, num_layers: int, bits: Sequence[int]) -> dict[str, tuple[float, float]]:
    """Per tensor kind: the median KL increase per saved code bit of sharing a pair at ``base_bits``
    (saves ``base_bits``) and of lowering both layers of a pair to the lowest width instead (saves
    the same when ``base_bits`` is twice the lowest, e.g. 2 -> 1). NaN where not measured."""
    low, b = min(bits), sens.base_bits
    rates = {}
    for kind in _KINDS:
        share, lower = [], []
        for j in range(num_layers // 2):
            if (j, kind, b) in sens.shared:
                share.append(sens.shared[(j, kind, b)] / b)
            if low < b and (2 * j, kind, low) in sens.layer and (2 * j + 1, kind, low) in sens.layer:
                lower.append((sens.layer[(2 * j, kind, low)] + sens.layer[(2 * j + 1, kind, low)]) / (2 * (b - low)))
        rates[kind] = (_median(share), _median(lower))
    return rates


def _median(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


# ============================================================================ results
@dataclass
class Candidate:
    """One verified config: how it was produced (``label``), its bits and its measured score."""

    label: str
    config: XQuantConfig
    code_bits: float
    stored_bits: float
    score: Score
    predicted_kl: float | None = None


@dataclass
class SearchResult:
    """What :func:`search` found for one budget; :meth:`summary` prints it."""

    budget_bits: float
    stored_budget_bits: float | None
    config: XQuantConfig
    code_bits: float
    stored_bits: float
    score: Score  # calibration text, decode conditions, verified
    predicted_kl: float | None
    sharing: str  # what was decided about cross-layer sharing, and why
    candidates: list[Candidate]  # every verified config for this budget
    reference: Score  # full precision on the same text
    presets: list[Candidate]  # the presets on the same text (empty with compare_presets=False)
    calibration: str  # which text, how many tokens
    seconds: float  # the whole search call (all budgets together)
    forwards: int
    stored_len: int = 8192
    stored_dtype: str = "bf16"
    notes: list[str] = field(default_factory=list)
    num_layers: int = 0
    sensitivity: Sensitivity | None = None  # the measurements the allocation used

    def layer_table(self) -> str:
        """Per-layer bits; ``s`` marks a tensor that reads the previous layer's codes."""
        return _layer_table(self.config.resolve(self.num_layers))

    def summary(self, presets: bool = True) -> str:
        """The config found, per-layer bits, scores and the sharing decision; with ``presets``, the
        presets' scores on the same text and the search's cost."""
        cfg = self.config
        budget = f"{self.budget_bits:g} code bits"
        if self.stored_budget_bits is not None:
            budget += f", {self.stored_budget_bits:g} stored bits"
        eta = ", ".join(f"eta_{b} = {_fmt_eta(e)}" for b, e in sorted(cfg.eta.items())) or "none"
        shares = []
        if cfg.k_share_from is not None:
            shares.append(f"keys from layer {cfg.k_share_from}")
        if cfg.v_share_from is not None:
            shares.append(f"values from layer {cfg.v_share_from}")
        ref = self.reference
        lines = [
            f"budget {budget} -> {cfg.name}: {self.code_bits:.4f} code bits, {self.stored_bits:.3f} stored bits "
            f"({self.stored_dtype}, {self.stored_len} tokens)",
            f"  calibration: {self.calibration}",
            f"  eta: {eta}; sharing starts: {', '.join(shares) or 'none'}",
            _indent(self.layer_table(), "  "),
            f"  score: ppl {self.score.ppl:.3f} (full precision {ref.ppl:.3f}), KL {self.score.kl:.4g} nats/token"
            + (f" (predicted {self.predicted_kl:.4g})" if self.predicted_kl is not None else ""),
            f"  sharing: {self.sharing}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  verified candidates:")
        lines.append(_indent(_candidate_table(self.candidates), "    "))
        if presets:
            lines.append(_indent(self.footer(), "  "))
        return "\n".join(lines)

    def footer(self) -> str:
        """The presets on the calibration text and the cost of the search call."""
        lines = []
        if self.presets:
            lines.append("presets on the same text:")
            lines.append(_indent(_candidate_table(self.presets), "  "))
        lines.append(f"search cost: {self.forwards} forwards, {self.seconds:.1f} s (all budgets of the call)")
        return "\n".join(lines)


def format_results(results: "SearchResult | Sequence[SearchResult]") -> str:
    """Several budgets of one :func:`search` call: each config, then the presets and cost once."""
    results = [results] if isinstance(results, SearchResult) else list(results)
    if not results:
        return ""
    return "\n\n".join([r.summary(presets=False) for r in results] + [results[-1].footer()])


def _fmt_eta(e: float) -> str:
    for num, den in ((1, 6), (1, 4), (1, 3)):
        if abs(e - num / den) < 1e-9:
            return f"{num}/{den}"
    return f"{e:g}"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _layer_table(plans: list[LayerPlan]) -> str:
    def cell(p: LayerPlan, kind: str) -> str:
        bits = p.k_bits if kind == "k" else p.v_bits
        shares = p.k_shares if kind == "k" else p.v_shares
        return f"{bits}{'s' if shares else ''}"

    width = max(3, len(str(len(plans) - 1)) + 1)
    rows = [("layer", [str(p.index) for p in plans]), ("K", [cell(p, "k") for p in plans]),
            ("V", [cell(p, "v") for p in plans])]
    out = [f"{name:<6}" + "".join(f"{c:>{width}}" for c in cells) for name, cells in rows]
    out.append("(bits per layer; s: reads the previous layer's codes with its own scale/zero)")
    return "\n".join(out)


def _candidate_table(cands: list[Candidate]) -> str:
    from tabulate import tabulate

    rows = [[c.label, c.config.name, f"{c.code_bits:.4f}", f"{c.stored_bits:.3f}", f"{c.score.ppl:.3f}",
             f"{c.score.kl:.4g}", "" if c.predicted_kl is None else f"{c.predicted_kl:.4g}"] for c in cands]
    return tabulate(rows, headers=["candidate", "config", "code bits", "stored bits", "ppl", "KL", "predicted KL"])


# ============================================================================ search
def _num_layers_and_sliding(model, length: int) -> tuple[int, list[bool]]:
    num_layers = kv_geometry(model.config)[0]
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    sliding = [t != "full_attention" and window is not None and window < length for t in layer_types(model.config)]
    return num_layers, sliding


def minimum_code_bits(num_layers: int, bits: Sequence[int] = (1, 2), sharing: bool = True) -> float:
    """The fewest code bits :func:`search` can reach: every tensor at the lowest width, and with
    ``sharing`` every odd layer reading its partner's codes."""
    low = min(bits)
    start = 0 if sharing else None
    return XQuantConfig(k_bits=low, v_bits=low, k_share_from=start, v_share_from=start).code_bits(num_layers)


def _stored_bits(model, config: XQuantConfig, length: int, dtype: torch.dtype) -> float:
    return XQuantCache(model.config, config, max_cache_len=length).memory_report(dtype)["stored_bits"]


def _check_bits(bits) -> tuple[int, ...]:
    bits = tuple(sorted(set(bits)))
    if not bits or any(b not in QUANT_BITS for b in bits):
        raise ValueError(f"bits={bits!r}: choose widths from {QUANT_BITS}")
    return bits


def _budgets(budget_bits) -> tuple[list[float], bool]:
    single = isinstance(budget_bits, (int, float)) and not isinstance(budget_bits, bool)
    values = [budget_bits] if single else list(budget_bits)
    if not values or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0
                         for b in values):
        raise ValueError(f"budget_bits={budget_bits!r}: a positive number of code bits per value, or a list of them")
    return [float(b) for b in values], single


def search(
    model,
    budget_bits: float | Sequence[float],
    tokenizer=None,
    *,
    text: str | None = None,
    input_ids: torch.Tensor | None = None,
    tokens: int = 384,
    segments: int = 1,
    bits: Sequence[int] = (1, 2),
    sharing: bool = True,
    eta_grid: dict[int, Sequence[float]] | None = None,
    stored_budget_bits: float | None = None,
    stored_len: int = 8192,
    stored_dtype: torch.dtype = torch.bfloat16,
    group_size: int = 32,
    residual_length: int = 128,
    metadata_dtype: str | None = None,
    prefill: int | None = None,
    compare_presets: bool = True,
    progress: bool = False,
) -> SearchResult | list[SearchResult]:
    """Find an :class:`XQuantConfig` for ``model`` under a code-bit budget (module docstring: how).

    Args:
        model: a transformers decoder-only causal LM.
        budget_bits: code bits per cached value (``config.code_bits() <= budget``); a list solves
            several budgets in one call, sharing the measurements, and returns a list.
        tokenizer: tokenizes ``text`` (default :func:`calibration_text`); or give ``input_ids``.
        text, input_ids: the calibration text, or its ids ``[tokens]`` / ``[segments, tokens]``.
        tokens, segments: the calibration uses ``segments`` windows of ``tokens`` tokens (more than
            ``residual_length``: only tokens older than the window are ever quantized).
        bits: widths a tensor may take (from 1, 2, 4).
        sharing: allow cross-layer code sharing.
        eta_grid: ``{bits: candidate etas}`` (default :data:`DEFAULT_ETA_GRID`); a width without
            a grid is not calibrated.
        stored_budget_bits: optional bound on stored bits per value as the cache holds them at
            ``stored_len`` tokens in ``stored_dtype`` (codes, scales, zero points, window).
        group_size, residual_length: G and R of the configs (not searched).
        metadata_dtype: how the configs store scales and zero points (``XQuantConfig.metadata_dtype``;
            not searched): the simulator quantizes them so, stored bits count them so, and the
            presets of the report are scored with it too.
        prefill: tokens prefilled per window before decoding (default ``residual_length``).
        compare_presets: also score the presets on the calibration text, for the report.

    Raises ``ValueError`` when a budget is below what the search can reach (the message names the
    minimum), and on malformed arguments.
    """
    t0 = time.perf_counter()
    budgets, single = _budgets(budget_bits)
    bits = _check_bits(bits)
    eta_grid = DEFAULT_ETA_GRID if eta_grid is None else {int(b): tuple(g) for b, g in eta_grid.items()}
    XQuantConfig(group_size=group_size, residual_length=residual_length, metadata_dtype=metadata_dtype)  # validates
    num_layers = kv_geometry(model.config)[0]
    low = minimum_code_bits(num_layers, bits, sharing)
    for b in budgets:
        if b < low - 1e-9:
            how = (f"{min(bits)}-bit keys and values" + (", odd layers sharing their partner's codes" if sharing else ""))
            raise ValueError(f"budget_bits={b:g} is below the minimum the search can reach on this {num_layers}-layer "
                             f"model: {low:.4f} code bits ({how})")
    stored_dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(stored_dtype)
    if stored_dtype_name is None:
        raise ValueError(f"stored_dtype={stored_dtype!r}: one of torch.bfloat16, torch.float16, torch.float32")
    if stored_budget_bits is not None:
        floor_cfg = XQuantConfig(k_bits=min(bits), v_bits=min(bits), k_share_from=0 if sharing else None,
                                 v_share_from=0 if sharing else None, group_size=group_size,
                                 residual_length=residual_length, metadata_dtype=metadata_dtype)
        floor_stored = _stored_bits(model, floor_cfg, stored_len, stored_dtype)
        if stored_budget_bits < floor_stored - 1e-9:
            raise ValueError(f"stored_budget_bits={stored_budget_bits:g} is below the minimum the search can reach: "
                             f"{floor_stored:.4f} stored bits ({stored_dtype_name}, {stored_len} tokens)")

    ids, calibration = _calibration_ids(tokenizer, text, input_ids, tokens, segments)
    if ids.shape[1] <= residual_length + 1:
        raise ValueError(f"calibration windows of {ids.shape[1]} tokens: they must be longer than residual_length + 1 "
                         f"= {residual_length + 1} tokens (only tokens older than the window are quantized)")
    if any(_num_layers_and_sliding(model, ids.shape[1])[1]):
        raise ValueError(f"{type(model).__name__} has sliding-window layers: the search allocates bits to "
                         "full-attention layers only and does not support such models yet")
    sim = DecodeSimulator(model, ids.to(model.device), prefill, group_size, residual_length, metadata_dtype)
    calibration += f", {sim.P} prefilled per window, {sim.scored_tokens} tokens scored"

    def stored(config: XQuantConfig) -> float:
        return _stored_bits(model, config, stored_len, stored_dtype)

    # 1. eta per width, each on the cache with every tensor at that width
    eta: dict[int, float] = {}
    for b in bits:
        grid = eta_grid.get(b, ())
        if len(grid) > 1:
            uniform = [LayerPlan(i, b, b) for i in range(num_layers)]
            scores = [(sim.run(uniform, {b: e}).kl, e) for e in grid]
            eta[b] = min(scores)[1]
        elif grid:
            eta[b] = float(grid[0])
    logger.info("eta %s", eta)

    # 2. sensitivities from the all-base cache
    base_bits = 2 if 2 in bits else max(bits)
    sens = measure_sensitivity(sim, bits, eta, base_bits, sharing, progress)
    rates = sharing_rates(sens, num_layers, bits) if sharing else {}

    # 3-5. allocation, verification, eta refinement, per budget from the smallest up
    cache: dict[tuple, Score] = {}

    def verify(config: XQuantConfig) -> Score:
        key = _plan_key(config, num_layers)
        if key not in cache:
            cache[key] = sim.score(config)
        return cache[key]

    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    by_index: dict[int, SearchResult] = {}
    previous: SearchResult | None = None
    for i in order:
        budget = budgets[i]
        name = f"search-{budget:g}" + (f":metadata_dtype={metadata_dtype}" if metadata_dtype else "")
        code_total = int(math.floor(budget * 2 * num_layers + 1e-9))
        candidates: list[Candidate] = []
        modes = _MODES if sharing else ("none",)
        seen: set[tuple] = set()
        for mode in modes:
            alloc = _fit_allocation(sens, num_layers, code_total, bits, mode, eta, group_size, residual_length,
                                    stored, stored_budget_bits, metadata_dtype)
            if alloc is None:
                continue
            config = alloc.config(eta, group_size, residual_length, name, metadata_dtype)
            _check_expressed(config, alloc, num_layers)
            if _plan_key(config, num_layers) in seen:  # the same config as a mode already verified
                continue
            seen.add(_plan_key(config, num_layers))
            candidates.append(Candidate(label=f"best, sharing: {mode}", config=config,
                                        code_bits=config.code_bits(num_layers), stored_bits=stored(config),
                                        score=verify(config), predicted_kl=sens.base.kl + alloc.predicted_increase))
        if not candidates:
            raise ValueError(f"no config fits budget_bits={budget:g}"
                             + (f" and stored_budget_bits={stored_budget_bits:g}" if stored_budget_bits else ""))
        winner = min(candidates, key=lambda c: c.score.kl)
        sharing_text = _sharing_verdict(candidates, winner, rates, num_layers, sharing)
        refined = _refine_eta(winner, eta_grid, verify, num_layers)
        if refined is not winner:
            candidates.append(refined)
            winner = refined
        notes = []
        if previous is not None and previous.score.kl < winner.score.kl:
            notes.append(f"the best config found for {budget:g} bits scored worse (KL {winner.score.kl:.4g}) than the "
                         f"one for {previous.budget_bits:g} bits; that one is returned, it fits this budget too")
            winner = Candidate(label=f"from budget {previous.budget_bits:g}", config=previous.config,
                               code_bits=previous.code_bits, stored_bits=previous.stored_bits, score=previous.score,
                               predicted_kl=previous.predicted_kl)
            candidates.append(winner)
            sharing_text = previous.sharing
        result = SearchResult(
            budget_bits=budget, stored_budget_bits=stored_budget_bits, config=winner.config,
            code_bits=winner.code_bits, stored_bits=winner.stored_bits, score=winner.score,
            predicted_kl=winner.predicted_kl, sharing=sharing_text, candidates=candidates,
            reference=sim.reference, presets=[], calibration=calibration, seconds=0.0, forwards=0,
            stored_len=stored_len, stored_dtype=stored_dtype_name, notes=notes, num_layers=num_layers,
            sensitivity=sens,
        )
        by_index[i] = result
        previous = result

    presets: list[Candidate] = []
    if compare_presets:
        for preset in XQuantConfig.PRESETS:
            config = XQuantConfig.preset(preset).replace(group_size=group_size, residual_length=residual_length,
                                                         metadata_dtype=metadata_dtype)
            presets.append(Candidate(label="preset", config=config, code_bits=config.code_bits(num_layers),
                                     stored_bits=stored(config), score=verify(config)))
    seconds = time.perf_counter() - t0
    results = [by_index[i] for i in range(len(budgets))]
    for r in results:
        r.presets, r.seconds, r.forwards = presets, seconds, sim.forwards
    logger.info("search: %d forwards, %.1f s", sim.forwards, seconds)
    return results[0] if single else results


def _calibration_ids(tokenizer, text, input_ids, tokens: int, segments: int) -> tuple[torch.Tensor, str]:
    """``[segments, tokens]`` ids of the calibration text (2-D ``input_ids`` are used as given)."""
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments={segments!r}: a positive int")
    if not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens={tokens!r}: a window length in tokens")
    need = tokens * segments
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[1] <= 1:
                raise ValueError(f"input_ids of shape {tuple(ids.shape)} are too short")
            return ids, f"given ids, {ids.shape[0]} x {ids.shape[1]} tokens"
        ids = ids.reshape(-1)
        source = "given ids"
    else:
        if tokenizer is None:
            raise ValueError("search needs a tokenizer (to tokenize the calibration text) or input_ids")
        source = "given text" if text is not None else (
            "docstrings of Python's " + ", ".join(CALIBRATION_MODULES) + " modules")
        ids = tokenizer(text if text is not None else calibration_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < need:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {segments} x {tokens} = {need} are needed")
    return ids[:need].view(segments, tokens), f"{source}, first {segments} x {tokens} tokens"


def _fit_allocation(sens, num_layers, code_total, bits, mode, eta, group_size, residual_length, stored,
                    stored_budget, metadata_dtype=None) -> Allocation | None:
    """The best allocation under ``code_total``, lowered until it also fits the stored budget."""
    total = code_total
    while total >= 0:
        alloc = allocate(sens, num_layers, total, bits, mode)
        if alloc is None:
            return None
        if stored_budget is None:
            return alloc
        config = alloc.config(eta, group_size, residual_length, "probe", metadata_dtype)
        if stored(config) <= stored_budget + 1e-9:
            return alloc
        total = alloc.code_total - 1
    return None


def _check_expressed(config: XQuantConfig, alloc: Allocation, num_layers: int) -> None:
    """The config resolves to the allocation's plan: same bits, and sharing exactly where the
    allocation counted it (its code total)."""
    plans = config.resolve(num_layers)
    same_bits = [p.k_bits for p in plans] == list(alloc.k_bits) and [p.v_bits for p in plans] == list(alloc.v_bits)
    total = config.code_bits(num_layers) * 2 * num_layers
    if not same_bits or abs(total - alloc.code_total) > 1e-6:
        raise AssertionError(f"the config {config} does not express the allocation {alloc}")


def _plan_key(config: XQuantConfig, num_layers: int) -> tuple:
    """What decides a config's cache contents: its resolved plans, eta of the widths used, G and R."""
    plans = tuple(config.resolve(num_layers))
    used = {p.k_bits for p in plans} | {p.v_bits for p in plans}
    eta = tuple(sorted((b, e) for b, e in config.eta.items() if b in used and e))
    return plans, eta, config.group_size, config.residual_length, config.metadata_dtype


def _refine_eta(winner: Candidate, eta_grid, verify, num_layers: int) -> Candidate:
    """Coordinate search of eta over the grid, one width at a time, on the winner's bits."""
    config, best = winner.config, winner.score
    used = {p.k_bits for p in config.resolve(num_layers)} | {p.v_bits for p in config.resolve(num_layers)}
    improved = False
    for b in sorted(used & set(eta_grid)):
        for e in eta_grid[b]:
            if abs(config.eta.get(b, 0.0) - e) < 1e-12:
                continue
            trial = config.replace(eta={**config.eta, b: e})
            s = verify(trial)
            if s.kl < best.kl:
                config, best, improved = trial, s, True
    if not improved:
        return winner
    return Candidate(label="winner, eta refined", config=config, code_bits=winner.code_bits,
                     stored_bits=winner.stored_bits, score=best, predicted_kl=winner.predicted_kl)


def _sharing_verdict(candidates: list[Candidate], winner: Candidate, rates, num_layers: int, sharing: bool) -> str:
    """What was decided about sharing at one budget, from the verified candidates (same eta)."""
    if not sharing:
        return "not allowed (sharing=False)"
    rate_text = "; ".join(
        f"{'keys' if k == 'k' else 'values'}: sharing a pair costs {s:.4g} KL per saved bit (median), lowering "
        f"bits {lw:.4g}" for k, (s, lw) in rates.items() if not math.isnan(s) and not math.isnan(lw))
    unshared = [c for c in candidates if not _uses_sharing(c.config, num_layers)]
    shared = [c for c in candidates if _uses_sharing(c.config, num_layers)]
    uses = _uses_sharing(winner.config, num_layers)
    if not shared:
        return f"not used: by the measured sensitivities no pair is worth sharing at this budget ({rate_text})"
    if not unshared:
        return f"used, and required: without it no config reaches this budget ({rate_text})"
    best_plain = min(unshared, key=lambda c: c.score.kl)
    best_shared = min(shared, key=lambda c: c.score.kl)
    if uses:
        return (f"used: the best config with sharing verified at KL {best_shared.score.kl:.4g} against "
                f"{best_plain.score.kl:.4g} for the best without ({rate_text})")
    return (f"not used: it costs more than it saves here; the best config with sharing verified at KL "
            f"{best_shared.score.kl:.4g} against {best_plain.score.kl:.4g} without ({rate_text})")


def _uses_sharing(config: XQuantConfig, num_layers: int) -> bool:
    return any(p.k_shares or p.v_shares for p in config.resolve(num_layers))
