"""Memory planner: how many tokens, or how large a batch, fits on one GPU with a given KV cache.

The planner counts three things against the GPU's memory:

* **weights** — :func:`weight_bytes`, exact parameter bytes of ``AutoModelForCausalLM.from_config``
  built on the ``meta`` device (no memory is allocated), every parameter at the requested dtype,
  tied parameters counted once, buffers (rotary tables) ignored.
* **reserve** — ``reserve_fraction`` of the GPU memory (default 10%) held back for everything that
  is neither weights nor cache: activations and logits of the forward pass, the CUDA context,
  cuBLAS/compile workspaces and allocator fragmentation. It is a flat fraction, not a model of the
  activations; raise it for long prefills (activations grow with prompt length) or large vocabularies.
* **KV cache** — what is left. Cache bytes come from
  ``XQuantCache(config, preset, max_batch_size=B, max_cache_len=L).memory_report(dtype)["bytes"]``,
  which is exact before allocation. The cache has fixed per-layer costs (the full-precision residual
  window, whole key groups, sliding windows), so bytes are not proportional to ``L``; the planner
  therefore searches: the largest ``L`` that fits at batch ``B``, and the largest ``B`` that fits at
  length ``L``, each by doubling then bisection on the exact byte count.

Bundled configs (``xquant_fx/configs/<name>.json``, written from the public architecture facts)
let the planner run without downloading anything; :func:`load_config` also takes a path to a
``config.json`` or to a model directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ._checks import positive_int
from .cache import XQuantCache
from .config import XQuantConfig
from .hf import text_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: ``max_cache_len`` when none is given: the model's ``max_position_embeddings``, capped here.
DEFAULT_MAX_CACHE_LEN_CAP = 32768
#: Fraction of GPU memory kept free for activations, CUDA context and fragmentation.
DEFAULT_RESERVE_FRACTION = 0.1
#: Largest token count / batch the search tries; a cache still fitting there is "unbounded".
_SEARCH_CAP = 1 << 40

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY_RE = re.compile(r"^\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")


# ---------------------------------------------------------------------------------------- configs
def bundled_configs() -> list[str]:
    """Names of the configs shipped in ``xquant_fx/configs`` (``"llama-3.1-8b"``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _config_from_dict(data: dict, origin: str):
    from transformers import AutoConfig

    if "model_type" not in data:
        raise ValueError(f"{origin} has no `model_type`: cannot tell which transformers config class to build")
    # Before transformers sees them: its own validation divides by head counts.
    for section in (data, data.get("text_config") if isinstance(data.get("text_config"), dict) else {}):
        for field_name in _SHAPE_FIELDS:
            if section.get(field_name) is not None:
                _check_size(section[field_name], field_name, origin)
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        # transformers' own validation divides by head counts: a zero there is a ZeroDivisionError.
        raise ValueError(f"{origin}: transformers cannot build a config from it: "
                         f"{type(exc).__name__}: {exc}") from exc


def load_config(name_or_path):
    """A transformers ``PretrainedConfig`` from a bundled name, a ``config.json`` path or a model dir.

    ``name_or_path`` is an existing JSON file (read with ``AutoConfig.for_model``), an existing
    directory holding ``config.json`` (``AutoConfig.from_pretrained``, offline), or else a bundled
    name (see :func:`bundled_configs`; a trailing ``.json`` is allowed). A config object is returned
    unchanged. Anything else raises ``ValueError`` listing the bundled names.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        raise ValueError(f"load_config takes a bundled name or a path, not {type(name_or_path).__name__}")
    text = str(name_or_path)
    bundled = bundled_configs()
    stem = text[:-5] if text.endswith(".json") else text
    if stem in bundled and not Path(text).exists():
        path = CONFIG_DIR / f"{stem}.json"
        config = _config_from_dict(json.loads(path.read_text()), f"bundled config {stem!r}")
        config.name_or_path = stem
        return config
    path = Path(text).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable JSON config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a config object")
        config = _config_from_dict(data, str(path))
        if not config.name_or_path:
            config.name_or_path = path.parent.name if path.name == "config.json" else path.stem
        return config
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"directory {path} has no config.json")
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the config in {path}: {exc}") from exc
    raise ValueError(
        f"unknown config {text!r}: not a bundled config, a config.json file or a model directory. "
        f"Bundled configs: {', '.join(bundled)}"
    )


# ---------------------------------------------------------------------------------------- sizes
def with_layers(config, layers: int | None):
    """``config`` cut to its first ``layers`` decoder layers, in place (and returned), for smaller
    runs of a real shape: ``num_hidden_layers``, the per-layer ``layer_types`` and the layer
    indices of ``mlp_only_layers`` follow. ``None`` or 0 leaves it whole."""
    if not layers:
        return config
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if getattr(config, "mlp_only_layers", None):
        config.mlp_only_layers = [i for i in config.mlp_only_layers if i < layers]
    return config


#: Sizes of a decoder that must be positive ints (``None``/absent: not checked, the model's default).
_SHAPE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")


def check_shape(config) -> None:
    """``ValueError`` naming the field if a decoder size of ``config`` is not a positive int: a
    0-layer or 0-head config otherwise ends in a division by zero deep inside the model or cache."""
    text_cfg = text_config(config)
    name = config.name_or_path or type(config).__name__
    for field_name in _SHAPE_FIELDS:
        value = getattr(text_cfg, field_name, None)
        if value is None and field_name != "num_hidden_layers":
            continue
        _check_size(value, field_name, f"config {name}")


def _check_size(value, field_name: str, origin: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{origin}: {field_name}={value!r}, must be a positive int")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype} is not supported: use bfloat16, float16 or float32")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported: use one of {', '.join(_DTYPES)}")


def weight_bytes(config, dtype=torch.bfloat16) -> int:
    """Exact parameter bytes of the causal-LM built from ``config``, every parameter in ``dtype``.

    The model is instantiated on the ``meta`` device (no memory, well under a second for 8B-class
    models); parameters are deduplicated, so tied input/output embeddings count once. Buffers
    (non-persistent rotary tables) are not counted.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(config)
    itemsize = _dtype(dtype).itemsize
    check_shape(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
        raise ValueError(f"cannot build a causal LM from {type(config).__name__}: {type(exc).__name__}: {exc}") from exc
    # parameters() yields each tensor once (remove_duplicate=True): tied weights are counted once.
    return sum(p.numel() for p in model.parameters()) * itemsize


def _xquant_config(preset) -> XQuantConfig:
    return XQuantConfig.coerce(preset, default=None, what="preset")


def cache_bytes(config, preset, batch_size: int, max_cache_len: int, dtype=torch.bfloat16) -> int:
    """Exact bytes of an ``XQuantCache`` of ``batch_size`` x ``max_cache_len`` tokens (nothing allocated)."""
    cache = XQuantCache(config, _xquant_config(preset), max_batch_size=batch_size, max_cache_len=max_cache_len)
    return cache.memory_report(dtype=_dtype(dtype))["bytes"]


def _largest_fitting(fits: Callable[[int], bool], cap: int = _SEARCH_CAP) -> int | None:
    """Largest ``n >= 1`` with ``fits(n)``, for ``fits`` true up to some point and false after.

    0 if ``fits(1)`` is false; ``None`` if ``fits(cap)`` still holds (bounded only by the cap).
    """
    if not fits(1):
        return 0
    lo = 1  # fits(lo) holds
    hi = 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        if fits(cap):
            return None
        hi = cap
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PresetFit:
    """What one cache preset buys within the plan's cache budget.

    ``max_tokens``: the longest sequence (prompt + generated) that fits at the plan's batch size
    (``None``: memory never runs out, e.g. every layer is a sliding window). It is a memory bound
    only; compare with :attr:`MemoryPlan.context_length`.
    ``max_batch``: the most sequences of the plan's ``max_cache_len`` tokens that fit.
    ``cache_bytes``: the cache for ``batch_size`` x ``max_cache_len``; ``fits`` whether it fits.
    ``bytes_per_token``: cache bytes of one sequence of ``max_cache_len`` tokens divided by
    ``max_cache_len`` (fixed per-layer costs amortized over that length).
    ``code_bits``/``stored_bits``: per K/V element, as in ``XQuantCache.memory_report``.
    """

    preset: str
    code_bits: float
    stored_bits: float
    bytes_per_token: float
    max_tokens: int | None
    max_batch: int
    cache_bytes: int
    fits: bool


@dataclass(frozen=True)
class MemoryPlan:
    """Result of :func:`plan`: the memory budget and, side by side, the preset and the bf16 baseline.

    ``cache_budget_bytes = gpu_memory_bytes - reserve_bytes - weight_bytes`` (0 if negative; then
    ``weights_fit`` is false and nothing fits).
    """

    model: str
    dtype: str
    gpu_memory_bytes: int
    reserve_fraction: float
    reserve_bytes: int
    weight_bytes: int
    cache_budget_bytes: int
    weights_fit: bool
    batch_size: int
    max_cache_len: int
    context_length: int | None
    preset: PresetFit
    baseline: PresetFit

    @property
    def rows(self) -> list[PresetFit]:
        return [self.preset, self.baseline]

    def as_dict(self) -> dict:
        return asdict(self)


def _fit(config, xq: XQuantConfig, budget: int, batch_size: int, max_cache_len: int, dtype) -> PresetFit:
    def size(b: int, n: int) -> int:
        return cache_bytes(config, xq, b, n, dtype)

    one = XQuantCache(config, xq, max_batch_size=1, max_cache_len=max_cache_len).memory_report(dtype=dtype)
    at_target = size(batch_size, max_cache_len)
    return PresetFit(
        preset=xq.name,
        code_bits=one["code_bits"],
        stored_bits=one["stored_bits"],
        bytes_per_token=one["bytes"] / max_cache_len,
        max_tokens=_largest_fitting(lambda n: size(batch_size, n) <= budget),
        max_batch=_largest_fitting(lambda b: size(b, max_cache_len) <= budget) or 0,
        cache_bytes=at_target,
        fits=at_target <= budget,
    )


def plan(
    config,
    preset_or_xquant_config="xquant-1.38",
    gpu_memory_bytes=None,
    max_cache_len: int | None = None,
    batch_size: int | None = None,
    dtype=torch.bfloat16,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
) -> MemoryPlan:
    """How many tokens, and what batch, fit on a GPU of ``gpu_memory_bytes`` with this cache.

    Args:
        config: a transformers config, a bundled name or a path (see :func:`load_config`).
        preset_or_xquant_config: an :class:`XQuantConfig`, a preset name or a spec
            (:meth:`XQuantConfig.from_spec`, e.g. ``"kivi-2:metadata_dtype=float8_e4m3fn"``).
        gpu_memory_bytes: GPU memory, an int of bytes or a string for :func:`parse_memory` ("80GB").
        max_cache_len: tokens per sequence for the "max batch" question. Default: the model's
            ``max_position_embeddings`` capped at ``DEFAULT_MAX_CACHE_LEN_CAP`` (32768), or the cap
            if the config has none.
        batch_size: sequences for the "max tokens" question (default 1).
        dtype: of the weights and of the cache's full-precision parts.
        reserve_fraction: share of ``gpu_memory_bytes`` kept for activations, CUDA context and
            fragmentation (see the module docstring), in [0, 1).

    Returns a :class:`MemoryPlan` with the preset and the ``fp16`` preset (a 16-bit cache in
    ``dtype``) side by side.
    """
    config = load_config(config)
    check_shape(config)
    xq = _xquant_config(preset_or_xquant_config)
    dtype = _dtype(dtype)
    if gpu_memory_bytes is None:
        raise ValueError("gpu_memory_bytes is required (bytes, or a string such as '80GB')")
    gpu = parse_memory(gpu_memory_bytes) if isinstance(gpu_memory_bytes, str) else gpu_memory_bytes
    gpu = positive_int("gpu_memory_bytes", gpu)
    number = isinstance(reserve_fraction, (int, float)) and not isinstance(reserve_fraction, bool)
    if not number or not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be a number in [0, 1), got {reserve_fraction!r}")
    batch_size = 1 if batch_size is None else positive_int("batch_size", batch_size)
    text_cfg = text_config(config)
    context = getattr(text_cfg, "max_position_embeddings", None)
    if max_cache_len is None:
        max_cache_len = min(context, DEFAULT_MAX_CACHE_LEN_CAP) if context else DEFAULT_MAX_CACHE_LEN_CAP
    max_cache_len = positive_int("max_cache_len", max_cache_len)
    # Beyond the search cap the answers would be meaningless (the cap is "unbounded" to the search).
    for name, value in (("max_cache_len", max_cache_len), ("batch_size", batch_size)):
        if value > _SEARCH_CAP:
            raise ValueError(f"{name}={value:,} is beyond what the planner sizes (at most 2**40 = {_SEARCH_CAP:,})")

    weights = weight_bytes(config, dtype)
    reserve = int(gpu * reserve_fraction)
    budget = max(gpu - reserve - weights, 0)
    baseline = XQuantConfig.preset("fp16")
    return MemoryPlan(
        model=config.name_or_path or type(config).__name__,
        dtype=_DTYPE_NAMES[dtype],
        gpu_memory_bytes=gpu,
        reserve_fraction=float(reserve_fraction),
        reserve_bytes=reserve,
        weight_bytes=weights,
        cache_budget_bytes=budget,
        weights_fit=weights + reserve <= gpu,
        batch_size=batch_size,
        max_cache_len=max_cache_len,
        context_length=context,
        preset=_fit(config, xq, budget, batch_size, max_cache_len, dtype),
        baseline=_fit(config, baseline, budget, batch_size, max_cache_len, dtype),
    )


# ---------------------------------------------------------------------------------------- parsing
def parse_memory(text) -> int:
    """Bytes in a memory size: ``"80GB"`` (GB = 1e9), ``"141GiB"`` (GiB = 2**30), ``"80e9"``, ``"512 MiB"``.

    Units (case-insensitive): B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of
    1024); none means bytes. Fractions are floored to whole bytes. An int is returned as is.
    Raises ``ValueError`` on anything else or on a size below one byte.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ValueError(f"memory size must be at least 1 byte, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"memory size must be a string such as '80GB', not {type(text).__name__}")
    match = _MEMORY_RE.match(text)
    units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: expected a number and a unit ({units}), e.g. '80GB'")
    number, unit = match.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(f"unknown memory unit {unit!r} in {text!r}: use one of {units}")
    value = float(number) * _UNITS[unit.lower()]
    if value < 1 or value != value or value == float("inf"):
        raise ValueError(f"memory size {text!r} is below one byte or not finite")
    return int(value)


# ---------------------------------------------------------------------------------------- output
def _gb(n: int | float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def format_plan(result: MemoryPlan) -> str:
    """A text report of a :func:`plan` result: the budget, then a table with the preset, the bf16
    baseline and their ratio."""
    from tabulate import tabulate

    p, base = result.preset, result.baseline
    context = f"{result.context_length:,}" if result.context_length else "unknown"
    lines = [
        f"model: {result.model}   dtype: {result.dtype}   context: {context} tokens",
        f"GPU memory {_gb(result.gpu_memory_bytes)} - weights {_gb(result.weight_bytes)} - reserve "
        f"{_gb(result.reserve_bytes)} ({result.reserve_fraction:.0%}, activations/CUDA context) "
        f"= KV cache budget {_gb(result.cache_budget_bytes)}",
    ]
    if not result.weights_fit:
        lines.append("the weights and the reserve alone do not fit in this GPU memory: nothing fits")

    def tokens(fit: PresetFit) -> str:
        if fit.max_tokens is None:
            return "unbounded"
        note = " (> context)" if result.context_length and fit.max_tokens > result.context_length else ""
        return f"{fit.max_tokens:,}{note}"

    b, L = result.batch_size, result.max_cache_len
    table = [
        ["code bits / element", f"{p.code_bits:.3f}", f"{base.code_bits:.3f}", _ratio(base.code_bits, p.code_bits)],
        ["stored bits / element", f"{p.stored_bits:.3f}", f"{base.stored_bits:.3f}",
         _ratio(base.stored_bits, p.stored_bits)],
        [f"cache bytes / token (at {L:,})", _human_bytes(p.bytes_per_token), _human_bytes(base.bytes_per_token),
         _ratio(base.bytes_per_token, p.bytes_per_token)],
        [f"max tokens / sequence (batch {b})", tokens(p), tokens(base), _ratio(p.max_tokens, base.max_tokens)],
        [f"max batch (at {L:,} tokens)", f"{p.max_batch:,}", f"{base.max_batch:,}",
         _ratio(p.max_batch, base.max_batch)],
        [f"cache for batch {b} x {L:,}", _gb(p.cache_bytes) + ("" if p.fits else " (too big)"),
         _gb(base.cache_bytes) + ("" if base.fits else " (too big)"), _ratio(base.cache_bytes, p.cache_bytes)],
    ]
    headers = ["", p.preset, f"{base.preset} (baseline)", "gain"]
    lines.append(tabulate(table, headers=headers, colalign=("left", "right", "right", "right")))
    return "\n".join(lines)
