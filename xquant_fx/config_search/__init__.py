"""Config search: per-layer key/value bits, cross-layer sharing, eta and the quality options
(sink tokens, rotation, level fit, metadata dtype) under a code-bit and an optional stored-bit budget.

``search(model, budget_bits=1.4, tokenizer=tok)`` returns the :class:`XQuantConfig` it found for
that model, with a readable report (:meth:`SearchResult.summary`): the options chosen and the
screen that chose them, bits and sharing per layer, eta, code and stored bits, and the
decode-condition perplexity and KL on the calibration text next to full precision and the presets.

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
0. **Quality options** (:mod:`.options`). The candidates: ``sink_tokens`` in (0, 4, 8) (below
   ``residual_length``), ``rotation`` None or ``"hadamard"`` (only None when the head dims are not
   powers of two), ``level_fit`` ``"minmax"`` or ``"lsq"``, and ``metadata_dtype`` None or float8
   when a stored budget is given (without one, float8 only loses quality). An option the caller
   gives is fixed; ``options="off"`` leaves the others off (the search as it was before them).
   With a stored budget, sink counts and metadata dtypes with which not even the smallest config
   fits are dropped, and the metadata dtype the measurements use is the one that leaves the most
   code bits under the stored budget (stored bits are affine in code bits; float8 halves the
   scales' and zero points' cost). The **screen** scores every combination of sinks, rotation and
   level fit (12 at most) on one reference plan per budget: every layer at the same key and value
   widths, nearest the code bits the budgets leave (K2/V1 near 1.4 bits, K2/V2 near 2), min-max
   levels with the eta of step 1 measured with the options off. The allocation (steps 1-4) then
   runs under the best combination and, when the level fit is searched, the best with the other
   level fit too (``option_candidates=2``): least squares helps one-bit tensors and hurts two-bit
   ones, so which wins depends on the final mix of widths, and min-max gets its own eta under the
   options. Sensitivities are measured under the combination, since sinks and rotation change
   which layers are sensitive. At verification, sinks cost stored bits, so a combination's
   allocation is also verified with fewer sinks when they buy code bits, and with the model-dtype
   metadata at the code bits it leaves. ``level_fit="lsq"`` configs have no eta (the fit replaces
   calibration): steps 1 and 5's eta are skipped for them.
1. **eta** per bit width, by grid (the paper's grid, plus 1/4 for one bit): ``eta_2`` on the
   all-2-bit cache, ``eta_1`` on the all-1-bit cache (under the options).
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

What it does not search: the group size and the full-precision window (they change stored bits,
not code bits: a longer window would buy quality with bytes the code-bit budget does not count;
give a ``stored_budget_bits`` to bound those bytes too), 16-bit tensors (14 extra bits each) and,
by default, 4-bit tensors (``bits=(1, 2, 4)`` adds them; on SmolLM2 no layer gained measurably from
4 over 2 bits). One eta per bit width serves keys and values alike, as the config stores it.
Sharing can only start at a layer and run to the end (the config's ``*_share_from``), so inside
that range a pair with equal bits must share; the allocation works within that rule. Models with
sliding-window layers are refused.

Cost on SmolLM2-135M (30 layers, one 384-token calibration window, 256 positions scored, fp32),
with ``options="off"``: 161 forwards for three budgets in one call (2 reference/base, 7 eta, 120
sensitivities, 4 verifications and up to 5 eta trials per budget, 5 presets), 143 s on one thread
of a 2-core Xeon shared with other jobs (0.5 to 0.9 s a forward); the sensitivities are three
quarters of it. Searching the options adds the screen (12 forwards per reference plan), a second
eta and sensitivity measurement (about 130 forwards) and the verification of the second
combination: roughly twice the cost (``SearchResult.timings`` has it per stage).
Decoding the same 256 positions token by token through the cache costs 30 to 60 s per candidate.
``SearchResult.seconds`` and ``forwards`` record a run's own cost; ``tokens`` trades cost for a
longer calibration context.

The default calibration text (:func:`calibration_text`) is the module docstrings of standard-library
modules that the evaluation corpus of :mod:`xquant_fx.evaluate` does not use, so a searched config
is never evaluated on the text it was chosen on (:func:`check_disjoint`). After its ``segments``
windows the search adds ``copy_windows`` (default 1) windows in which the next ``tokens / 2``
tokens of the text come twice: predicting the second copy means attending ``tokens / 2`` positions
back, past the full-precision window, which is what retrieval asks of the cache and what 384
tokens of running text barely exercise. Their KL enters the objective like any other window's, so
the allocation keeps bits where long-range copying needs them. On SmolLM2 at 1.4 code / 2.1
stored bits (4 sinks, Hadamard, least-squares levels, float8 metadata fixed), one copy window
took the evaluation perplexity from 1.088x to 1.077x full precision and retrieval from 18 to 20 of
24 cases; it doubles the calibration forward's length.

Modules: :mod:`.simulator` (:class:`DecodeSimulator`), :mod:`.allocation` (sensitivities and the
bit allocation), :mod:`.report` (:class:`SearchResult` and its tables), :mod:`.entry` (:func:`search`
and the calibration text).
"""

from .allocation import Allocation, Sensitivity, allocate, measure_sensitivity, sharing_rates
from .entry import (CALIBRATION_MODULES, DEFAULT_ETA_GRID, calibration_text, check_disjoint, minimum_code_bits,
                    search)
from .options import DEFAULT_SINKS, SEARCH, ScreenRow
from .report import Candidate, SearchResult, format_results
from .simulator import DecodeSimulator, QualityOptions, Score

__all__ = [
    "CALIBRATION_MODULES", "DEFAULT_ETA_GRID", "DEFAULT_SINKS", "SEARCH", "Allocation", "Candidate", "DecodeSimulator",
    "QualityOptions", "Score", "ScreenRow", "SearchResult", "Sensitivity", "allocate", "calibration_text",
    "check_disjoint", "format_results", "measure_sensitivity", "minimum_code_bits", "search", "sharing_rates",
]
