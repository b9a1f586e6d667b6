"""Export a causal LM with its quantized KV cache to an AOTInductor package, and run it without the model.

``export(model, example_inputs, path, config)`` writes one ``.pt2`` file; ``load(path)`` returns an
:class:`ExportedLM` whose ``generate`` produces greedy tokens from that file alone (plus a tokenizer
to turn text into ids): no transformers model object, no Python model code, no compilation at load.

What the package holds
----------------------
Two AOTInductor models compiled from the same weights, with their metadata as a JSON extra file
(``extra/xquant_fx.json``: format version, XQuant config, batch, ``max_cache_len``, dtype, device,
the cache tensors, eos/pad ids, the vocabulary, the C++ runtime the compiler linked against) and a
checksum manifest (``extra/xquant_fx_manifest.json``: SHA-256 and size of every other member, which
:func:`load` checks before any native code is loaded; :func:`verify_package`)::

    decode : (input_ids [B, 1] int64, position [1] int64) -> logits [B, V] of that token
    prefill: (input_ids [B, P] int64, length [1] int64)   -> logits [B, V] of token length - 1

``decode`` stores one token per sequence at ``position`` and attends over everything stored.
``prefill`` stores a prompt of ``length <= P`` tokens, right-padded to ``P``, from position 0 (the
runner zeroes the cache first) and attends over it in full precision, as
:class:`~xquant_fx.cache.XQuantCache` does for a prompt. All shapes are static: ``B`` is the
``max_batch_size`` fixed at export, one position is shared by the batch (no padding between
sequences), and ``P = max_prompt_len = min(residual_length, max_cache_len)``. Within ``P`` tokens a
prefill quantizes nothing, only fills the full-precision window; causal attention keeps the padding
out of the real tokens, and the program zeroes the window slots the padding filled, so the cache
ends exactly as after a prefill of the real tokens. (The prompt length cannot simply be a dynamic
dimension: the cache derives its slices from it with Python arithmetic.) A longer prompt is
prefilled ``P`` tokens at once and the rest one token at a time through ``decode``: the cache
stores the same way, but those prompt tokens attend to the quantized past as decode steps do, so
their logits are not bit-identical to a one-shot prefill of the whole prompt. ``prefill=False``
exports ``decode`` only (half the compile time); the whole prompt then goes through ``decode``.

Where the cache state lives
---------------------------
The cache tensors (codes, scales, zero points, full-precision windows) are buffers of the exported
modules, written in place by the graph (``xquant::append_token``, ``index_copy_``), so in the
package they are AOTInductor constants that the compiled code mutates. Two facts shaped the rest
(measured with torch 2.13; the tests check them through the runner):

* a large mutated buffer persists across calls of a loaded package, but a one-element buffer is
  folded into a compile-time value and its updates are lost (pytorch/pytorch#165444). The cache's
  token counter (``cumulative_length``, one element per layer) is therefore not state: the position
  is an input of ``decode``, copied into the counter at the start of each step, and ``prefill``
  starts at position 0 by construction;
* each AOTInductor model owns its constants, and ``decode`` must read what ``prefill`` wrote. The
  runner allocates the cache tensors itself and hands the same tensors to both models as
  user-managed constants (``load_constants(..., user_managed=True)``): both programs read and write
  the runner's memory. :attr:`ExportedLM.state` exposes it (named as in ``XQuantLayer.storage``),
  :meth:`ExportedLM.reset` zeroes it.

Weights are stored once: compiled with ``package_constants_in_so=False`` and the ``pickle_weights``
on-disk format, the two models' weights share storage and are deduplicated in the archive, loaded
once and shared by both models (metadata ``weights: "on_disk"``; a torch without that option gets
``"in_so"``, each model embedding its own copy). Such a package must be opened with :func:`load`
(``torch._inductor.aoti_load_package`` alone would leave the models without weights).

Which graphs, and where the fused attention is
----------------------------------------------
``decode`` is captured by Dynamo (``torch._dynamo.export``) at the torch level, where
:func:`xquant_fx.passes.run_passes` applies exactly as in the ``xquant`` backend:
``fuse_kv_attention`` replaces every quantized layer's ``read_keys``/``read_values`` + SDPA by one
``xquant::attend`` (the count is recorded in the metadata as ``fused_attention``). That graph is
then exported (``torch.export``, ATen level) and compiled by AOTInductor. ``prefill`` is exported
directly with ``torch.export`` (non-strict): the cache layers are pointed at the wrapper's buffers
while tracing, so the cache writes are buffer mutations, not writes to lifted constants. Its
attention is SDPA over the full-precision prompt (the pass declines prefill-sized queries).
``read_keys``/``read_values`` left in either graph are replaced by their torch reference, so a
package never calls back into Python for an ``xquant::`` op.

What works where
----------------

=================  ==========================================  ==========================================
                   CPU package                                 CUDA package
=================  ==========================================  ==========================================
decode attention   fused ``xquant::attend``, torch reference,  fused ``xquant::attend``: the Triton
                   compiled to C++ with the rest of the step   flash-decoding kernels, launched from the
                                                               package (kernel binaries embedded)
cache write        ``xquant::append_token`` reference, C++     ``xquant::append_token`` Triton kernel
prefill            SDPA + reference cache stores, C++          SDPA + cache stores, Inductor kernels
needs at run time  torch and xquant_fx (no model object; the    the same, on a GPU of the architecture
                   xquant ops and kernels are not imported)    the package was compiled for
=================  ==========================================  ==========================================

CI (``tests/test_export.py``) runs the CPU column; ``benchmarks/check_export_cuda.py`` checks the
CUDA column on a GPU machine (tokens against ``optimize()``, kernels in the package, load time,
tokens/s and peak memory beside ``optimize()`` and the strong bf16 baseline; ``docs/export.md``).
On CUDA, :func:`load` first checks the process's C++ runtime (see its ``runtime_check``): on the H200
image torch's loader crashes without ``LD_PRELOAD`` of the compiler's ``libstdc++``.

``xquant::append_token`` and ``xquant::attend`` are ``torch.library.triton_op`` s: AOTInductor
traces into their implementation for the export device. On CUDA that is the Triton kernels; on CPU
the reference (AOTInductor's CPU backend generates C++ and cannot hold a Triton kernel), which is
why a CPU export runs with ``XQUANT_FORCE_KERNELS`` switched off. :func:`inspect_package` reports
which xquant Triton kernels a package launches.

Not supported: caches with sliding-window layers (their transformers storage branches on the
stored length; choose ``max_cache_len`` no larger than the window, then every layer is quantized),
batches other than the exported one, left padding, beam search, sampling inside the package (the
package returns logits; :meth:`ExportedLM.generate` is greedy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from .config import MoESchedule, XQuantConfig

logger = logging.getLogger(__name__)

__all__ = ["ExportedLM", "PackageError", "export", "inspect_package", "load", "read_metadata", "verify_package"]

#: Version of the package layout written by :func:`export`; :func:`load` refuses others.
FORMAT_VERSION = 1
METADATA_FILE = "xquant_fx.json"
#: The checksum manifest (SHA-256 and size of every other member), beside the metadata.
MANIFEST_FILE = "xquant_fx_manifest.json"
DECODE, PREFILL = "decode", "prefill"
#: Top-level Triton kernels of :mod:`xquant_fx.kernels` whose launches :func:`inspect_package` looks for.
XQUANT_KERNELS = ("_append_token_kernel", "_attend_kernel", "_attend_tail_kernel", "_attend_merge_kernel")

#: Default of ``ExportedLM.generate(eos_token_id=...)``: the model's eos ids recorded at export.
_FROM_PACKAGE = object()

_DTYPES = {str(dt): dt for dt in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64,
                                   torch.float8_e4m3fn)}


class PackageError(ValueError):
    """A package that cannot be used as asked: not an xquant_fx package, another format version,
    another config/shape/device than requested, or a device this machine lacks."""


# ============================================================================ export
def export(
    model,
    example_inputs,
    path,
    config: XQuantConfig | str | None = None,
    *,
    max_cache_len: int,
    prefill: bool = True,
    inductor_configs: dict | None = None,
) -> str:
    """Compile ``model``'s decode step (and prefill) with an :class:`XQuantCache` into an
    AOTInductor package at ``path``; returns the path.

    Args:
        model: a transformers decoder-only causal LM in eval mode, on the device (``cpu`` or
            ``cuda``) and dtype the package is for.
        example_inputs: the prompt ids ``[B, L]`` (a tensor, or a tuple/dict holding
            ``input_ids``): ``B`` becomes the package's batch size; values and ``L`` do not matter.
        path: the ``.pt2`` file to write (its directory must exist; an existing file is replaced).
        config: an :class:`XQuantConfig` or a preset name (default ``"xquant-1.38"``).
        max_cache_len: tokens per sequence the package's cache holds (prompt + generated).
        prefill: also export the prefill program (default); ``False`` exports decode only.
        inductor_configs: Inductor options merged over the defaults (e.g. ``{"cpp.simdlen": 0}``
            halves CPU compile time at some run-time cost).

    Raises ``ValueError`` (naming the problem) for a model or config the cache cannot hold, a
    model with sliding-window cache layers, bad shapes or paths; ``RuntimeError`` when Dynamo or
    torch.export cannot capture the step in one graph.
    """
    from . import ops  # noqa: F401  (registers the xquant:: ops the graphs call)
    from .api import cache_argument
    from .cache import XQuantCache, XQuantLayer

    path = _check_output_path(path)
    options, weights = _inductor_options(inductor_configs)
    _check_model(model)
    xq = _resolve_config(config)
    ids = _example_ids(example_inputs)
    if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 2:
        raise ValueError(f"max_cache_len must be an int >= 2 (prompt + new tokens), got {max_cache_len!r}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"export supports models on cpu or cuda, not {device}")
    ids = ids.to(device)
    batch = ids.shape[0]
    cache = XQuantCache(model.config, xq, max_batch_size=batch, max_cache_len=max_cache_len,
                        device=device, dtype=dtype)
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, XQuantLayer):
            raise ValueError(
                f"layer {i} of {type(model).__name__} keeps a sliding-window cache ({type(layer).__name__}), which "
                "export does not support (its storage branches on the stored length); use a max_cache_len no "
                "larger than the model's sliding_window so that every layer is quantized"
            )
    entries = _state_entries(cache)
    cache_arg = cache_argument(model)
    forward_params = set(inspect.signature(model.forward).parameters)
    max_prompt = min(xq.residual_length, max_cache_len) if prefill else 0

    was_training = model.training
    model.eval()
    timings: dict[str, float] = {}
    try:
        with torch.no_grad(), _kernels_for(device):
            start = time.perf_counter()
            decode_ep, fused, decode_fqns = _capture_decode(model, cache, cache_arg, forward_params, entries,
                                                            batch, device)
            timings["capture_decode_s"] = time.perf_counter() - start
            programs = {DECODE: (decode_ep, decode_fqns)}
            if max_prompt >= 1:
                start = time.perf_counter()
                programs[PREFILL] = _capture_prefill(model, cache, cache_arg, forward_params, entries, batch,
                                                     max_prompt, device)
                timings["capture_prefill_s"] = time.perf_counter() - start
            num_layers = len(cache.layers)
            vocab = _vocab_size(model)
            meta = {
                "format_version": FORMAT_VERSION,
                "xquant_fx_version": _package_version(),
                "torch_version": torch.__version__,
                "model_class": type(model).__name__,
                "device": device.type,
                "dtype": str(dtype),
                "batch_size": batch,
                "max_cache_len": max_cache_len,
                "max_prompt_len": max_prompt if PREFILL in programs else 0,
                "num_layers": num_layers,
                "vocab_size": vocab,
                "input_vocab_size": _input_vocab_size(model, vocab),
                "config": config_to_dict(xq),
                "fused_attention": fused,
                "weights": weights,
                "quantized_layers": sum(1 for p in cache.plans if p.quantized),
                "eos_token_id": _token_ids(getattr(model.generation_config, "eos_token_id", None)),
                "pad_token_id": getattr(model.generation_config, "pad_token_id", None),
                "state": {key: {"shape": list(t.shape), "dtype": str(t.dtype)} for key, t in entries.items()},
                "constants": {name: fqns for name, (_, fqns) in programs.items()},
            }
            aoti_files = {}
            for name, (ep, _) in programs.items():
                start = time.perf_counter()
                aoti_files[name] = _compile(ep, options)
                timings[f"compile_{name}_s"] = time.perf_counter() - start
            meta["runtime_ops"] = sorted(set().union(*(_custom_ops_in(files) for files in aoti_files.values())))
            meta["export_timings_s"] = {k: round(v, 1) for k, v in timings.items()}
            meta["cxx_runtime"] = _compiler_cxx_runtime()
            _write_package(path, aoti_files, meta)
    finally:
        model.train(was_training)
    logger.info("xquant_fx: exported %s (%s, %d fused attention layers) to %s in %s", type(model).__name__,
                xq.name, fused, path, meta["export_timings_s"])
    return str(path)


def config_to_dict(config: XQuantConfig) -> dict:
    """JSON form of an :class:`XQuantConfig` (eta keys as strings)."""
    d = dataclasses.asdict(config)
    d["eta"] = {str(k): v for k, v in config.eta.items()}
    for name in ("k_bits", "v_bits", "moe_top_k"):
        if isinstance(d[name], tuple):
            d[name] = list(d[name])
    if isinstance(config.moe_top_k, MoESchedule):  # a NamedTuple: asdict would make it a plain tuple
        d["moe_top_k"] = {"schedule": config.moe_top_k._asdict()}
    return d


def config_from_dict(d: dict) -> XQuantConfig:
    d = dict(d)
    d["eta"] = {int(k): v for k, v in d.get("eta", {}).items()}
    for name in ("k_bits", "v_bits", "moe_top_k"):
        if isinstance(d.get(name), list):
            d[name] = tuple(d[name])
    if isinstance(d.get("moe_top_k"), dict):
        d["moe_top_k"] = MoESchedule(**d["moe_top_k"]["schedule"])
    return XQuantConfig(**d)


# ---------------------------------------------------------------------------- checks
def _check_output_path(path) -> Path:
    path = Path(os.fspath(path))
    if path.suffix != ".pt2":
        raise ValueError(f"export writes an AOTInductor package, whose file name must end in .pt2: {path}")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise ValueError(f"cannot write {path}: it exists and is not a file")
    return path


def _check_model(model) -> None:
    from .api import check_causal_lm

    check_causal_lm(model, "export")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generation_config"):
        raise ValueError(f"{type(model).__name__} is not a transformers causal LM (no `generation_config`)")


def _resolve_config(config) -> XQuantConfig:
    config = XQuantConfig.coerce(config)
    if config.prunes_experts:
        raise ValueError(
            f"config {config.name!r} sets MoE options (moe_*), which export does not apply (the package runs "
            "the model's own routing); use optimize() for expert pruning, or drop the moe_* fields"
        )
    return config


def _example_ids(example_inputs) -> torch.Tensor:
    ids = example_inputs
    if isinstance(ids, dict):
        if "input_ids" not in ids:
            raise ValueError(f"example_inputs has no 'input_ids' (keys: {sorted(ids)})")
        ids = ids["input_ids"]
    elif isinstance(ids, (tuple, list)):
        if not ids:
            raise ValueError("example_inputs is empty: pass the prompt ids [batch, length]")
        ids = ids[0]
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"example_inputs must be prompt ids of shape [batch, length], got {shape}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"example_inputs must be integer token ids, got {ids.dtype}")
    return ids.long()


def _vocab_size(model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def _input_vocab_size(model, default: int) -> int:
    """Rows of the input embedding: the token ids a package accepts are ``0 .. rows - 1``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if torch.is_tensor(weight) and weight.dim() == 2 else default


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if torch.is_tensor(value):
        value = value.tolist()
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _package_version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def _kernels_for(device: torch.device):
    """On CPU, trace the ops' torch reference even when ``XQUANT_FORCE_KERNELS=1`` (tests set it
    to run the kernels under Triton's interpreter): AOTInductor's CPU backend cannot hold a Triton
    kernel."""
    if device.type == "cuda":
        yield
        return
    saved = os.environ.get("XQUANT_FORCE_KERNELS")
    os.environ["XQUANT_FORCE_KERNELS"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["XQUANT_FORCE_KERNELS"]
        else:
            os.environ["XQUANT_FORCE_KERNELS"] = saved


# ---------------------------------------------------------------------------- state
def _state_entries(cache) -> dict[str, torch.Tensor]:
    """``"layer.name" -> tensor`` for every tensor the cache stores (a sharing layer has no codes
    of its own, so each tensor appears once)."""
    return {f"{i}.{name}": t for i, layer in enumerate(cache.layers) for name, t in layer.storage.items()}


def _fqns_of(named_tensors, entries: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map the exported program's constant names to state keys, by tensor identity."""
    by_id = {id(t): key for key, t in entries.items()}
    by_ptr = {(t.data_ptr(), t.dtype, tuple(t.shape)): key for key, t in entries.items()}
    found = {}
    for fqn, t in named_tensors:
        key = by_id.get(id(t)) or by_ptr.get((t.data_ptr(), t.dtype, tuple(t.shape)))
        if key is not None:
            found[fqn] = key
    return found


def _model_kwargs(forward_params, cache_arg, cache, input_ids, positions):
    kwargs = {"input_ids": input_ids, "position_ids": positions[None], cache_arg: cache, "use_cache": True}
    if "cache_position" in forward_params:  # transformers versions that still take it
        kwargs["cache_position"] = positions
    if "logits_to_keep" in forward_params:
        kwargs["logits_to_keep"] = 1
    return kwargs


# ---------------------------------------------------------------------------- decode
class _DecodeStep(torch.nn.Module):
    """One decode step of ``model`` over ``cache`` at an explicit position (see the module
    docstring for why the position is an input)."""

    def __init__(self, model, cache, cache_arg: str, forward_params: set[str]):
        super().__init__()
        self.model = model
        self.cache = cache  # not a module: Dynamo reaches its tensors through the layers
        self.cache_arg = cache_arg
        self.forward_params = forward_params

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(position.reshape(()))
        kwargs = _model_kwargs(self.forward_params, self.cache_arg, self.cache, input_ids, position)
        return self.model(**kwargs).logits[:, -1]


def _capture_decode(model, cache, cache_arg, forward_params, entries, batch, device):
    from .passes import PassReport, run_passes

    step = _DecodeStep(model, cache, cache_arg, forward_params)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    try:
        gm, _ = torch._dynamo.export(step, aten_graph=False)(ids, pos)
    except Exception as err:
        raise RuntimeError(
            f"Dynamo could not capture the decode step of {type(model).__name__} in one graph: {err}"
        ) from err
    finally:
        for layer in cache.layers:  # the trace ran the step once on the real tensors
            layer.reset()
    report = PassReport()
    run_passes(gm, report)
    fused = report.hits.get("fuse_kv_attention", 0)
    # Dynamo maps its flat attribute names back to the model's names for Inductor, but the weights
    # written beside the .so keep the flat names; drop the mapping so both use the same names.
    gm.meta.pop("dynamo_flat_name_to_original_fqn", None)
    try:
        ep = torch.export.export(gm, (ids, pos), strict=False)
    except Exception as err:
        raise RuntimeError(f"torch.export failed on the captured decode step: {err}") from err
    ep = _decompose_reads(ep)
    fqns = _fqns_of(list(gm.named_buffers()), entries)
    _check_state_covered(DECODE, fqns, entries)
    return ep, fused, fqns


# ---------------------------------------------------------------------------- prefill
class _PromptStart(int):
    """Stands in for a layer's token counter while the prefill is traced. The cache reads the
    counter of a prefill as a Python int (``int(cumulative_length)``): as a tensor it would be a
    data-dependent value, and every slice the prefill takes would depend on it. The prefill
    program's prompt starts at position 0, so the counter is the int 0; ``add_`` is a no-op because
    the counter is not state (the module docstring says why)."""

    def add_(self, other) -> "_PromptStart":
        return self


#: Cache tensors indexed by token position along dim 2 (position p < max_prompt_len in slot p).
_TOKEN_TENSORS = ("k_window", "v_window", "keys", "values")


class _PrefillStep(torch.nn.Module):
    """Store a right-padded prompt ``input_ids [B, P]`` of ``length`` real tokens from position 0
    and return the logits of its last real token.

    With ``P <= residual_length`` a prefill quantizes nothing: it writes positions ``0..P-1`` of
    the full-precision windows. Causal attention keeps the padding out of the real tokens, and the
    window slots it filled are zeroed after the model ran, so the cache ends exactly as a prefill
    of the ``length`` real tokens leaves it. The cache tensors are registered as buffers; while
    tracing, the cache layers are pointed at them."""

    def __init__(self, model, cache, cache_arg: str, forward_params: set[str], entries: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.cache = cache
        self.cache_arg = cache_arg
        self.forward_params = forward_params
        self.buffer_of = {}
        for key, tensor in entries.items():
            name = "xq_" + key.replace(".", "_")
            self.register_buffer(name, tensor)
            self.buffer_of[key] = name

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = length - 1
        with self._bound():
            kwargs = _model_kwargs(self.forward_params, self.cache_arg, self.cache, input_ids, positions)
            if "logits_to_keep" in kwargs:
                kwargs["logits_to_keep"] = last
                logits = self.model(**kwargs).logits[:, -1]
            else:
                logits = self.model(**kwargs).logits.index_select(1, last)[:, 0]
        for key, name in self.buffer_of.items():
            if key.split(".", 1)[1] in _TOKEN_TENSORS:
                buf = getattr(self, name)
                slots = torch.arange(buf.shape[2], device=buf.device)
                buf.masked_fill_((slots >= length)[None, None, :, None], 0)
        return logits

    @contextlib.contextmanager
    def _bound(self):
        saved = []
        for key, name in self.buffer_of.items():
            index, attr = key.split(".", 1)
            layer = self.cache.layers[int(index)]
            saved.append((layer, attr, getattr(layer, attr)))
            setattr(layer, attr, getattr(self, name))
        for layer in self.cache.layers:
            saved.append((layer, "cumulative_length", layer.cumulative_length))
            layer.cumulative_length = _PromptStart(0)
        try:
            yield
        finally:
            for layer, attr, value in reversed(saved):
                setattr(layer, attr, value)


def _capture_prefill(model, cache, cache_arg, forward_params, entries, batch, max_prompt, device):
    step = _PrefillStep(model, cache, cache_arg, forward_params, entries)
    ids = torch.zeros(batch, max_prompt, dtype=torch.long, device=device)
    length = torch.full((1,), max_prompt, dtype=torch.long, device=device)
    try:
        ep = torch.export.export(step, (ids, length), strict=False)
    except Exception as err:
        raise RuntimeError(f"torch.export could not capture the prefill of {type(model).__name__}: {err}") from err
    ep = _decompose_reads(ep)
    fqns = {name: key for key, name in step.buffer_of.items()}
    _check_state_covered(PREFILL, fqns, entries)
    return ep, fqns


def _check_state_covered(program: str, fqns: dict[str, str], entries: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(entries) - set(fqns.values()))
    if missing:
        raise RuntimeError(
            f"the exported {program} program does not hold the cache tensors {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''} as buffers; the package could not share its cache state"
        )


def _decompose_reads(ep):
    """Replace ``xquant::read_keys`` / ``read_values`` left in the graph by their torch reference,
    so the package calls no Python-registered op at run time."""
    from . import quant

    targets = {torch.ops.xquant.read_keys.default, torch.ops.xquant.read_values.default}
    if not any(n.op == "call_function" and n.target in targets for n in ep.graph.nodes):
        return ep
    return ep.run_decompositions({
        torch.ops.xquant.read_keys.default: quant.read_keys,
        torch.ops.xquant.read_values.default: quant.read_values,
    })


# ---------------------------------------------------------------------------- compile + package
_LAYOUT_OPTIONS = ("aot_inductor.package", "aot_inductor.package_constants_in_so",
                   "aot_inductor.package_constants_on_disk_format", "aot_inductor.package_constants_on_disk",
                   "aot_inductor.output_path")


def _inductor_options(user: dict | None) -> tuple[dict, str]:
    """AOTInductor options and where the weights go: ``"on_disk"`` (outside the .so, pickled once
    per storage, so the two models share them) where this torch can, else ``"in_so"`` (each model
    embeds its own copy)."""
    options = {"aot_inductor.package": True}
    aoti = torch._inductor.config.aot_inductor
    if hasattr(aoti, "package_constants_on_disk_format"):
        options["aot_inductor.package_constants_in_so"] = False
        options["aot_inductor.package_constants_on_disk_format"] = "pickle_weights"
        weights = "on_disk"
    elif hasattr(aoti, "package_constants_on_disk"):  # the option's name before it took a format
        options["aot_inductor.package_constants_in_so"] = False
        options["aot_inductor.package_constants_on_disk"] = True
        weights = "on_disk"
    else:
        weights = "in_so"
    for key, value in (user or {}).items():
        if key in _LAYOUT_OPTIONS:
            raise ValueError(f"inductor option {key!r} is set by export (the package layout depends on it)")
        options[key] = value
    return options, weights


def _compile(ep, options: dict) -> list:
    from .backend import with_source_stamp

    gm = ep.module()
    args, kwargs = ep.example_inputs
    files = torch._inductor.aot_compile(gm, args, kwargs, options=with_source_stamp(dict(options)))
    if not isinstance(files, list):
        raise RuntimeError(f"AOTInductor returned {type(files).__name__}, expected the list of package files")
    return files


def _custom_ops_in(files) -> set[str]:
    """``xquant::`` ops the compiled code calls through the proxy executor (none expected)."""
    found = set()
    for f in files:
        if isinstance(f, str) and f.endswith((".cpp", ".json")) and os.path.isfile(f):
            text = Path(f).read_text(errors="ignore")
            for op in ("append_token", "attend", "read_keys", "read_values"):
                if f"xquant::{op}" in text:
                    found.add(f"xquant::{op}")
    return found


def _write_package(path: Path, aoti_files: dict, meta: dict) -> None:
    from torch.export.pt2_archive._package import package_pt2

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = os.path.join(tmp, path.name)
        package_pt2(staged, aoti_files=aoti_files, extra_files={METADATA_FILE: json.dumps(meta, indent=1)})
        _add_manifest(staged)
        os.replace(staged, path)


# ---------------------------------------------------------------------------- integrity
_HASH_CHUNK = 1 << 22


def _member_digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> str:
    """SHA-256 of one member's bytes; reading it to the end also checks its zip CRC-32."""
    digest = hashlib.sha256()
    try:
        with archive.open(info) as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise PackageError(f"{path} is damaged: member {info.filename!r} cannot be read intact ({err}); "
                           "the file was corrupted after export: copy or export it again") from None
    return digest.hexdigest()


def _add_manifest(path: str) -> None:
    """Append ``extra/xquant_fx_manifest.json`` (SHA-256 and size of every other member) to the
    archive at ``path``."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        root = _metadata_member(infos, path).rsplit("extra/", 1)[0]
        members = {info.filename: {"size": info.file_size, "sha256": _member_digest(archive, info, path)}
                   for info in infos}
    manifest = {"algorithm": "sha256", "members": members}
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{root}extra/{MANIFEST_FILE}", json.dumps(manifest, indent=0))


def _metadata_member(infos, path) -> str:
    names = [i.filename for i in infos if i.filename.split("/", 1)[-1] == f"extra/{METADATA_FILE}"]
    if not names:
        raise PackageError(
            f"{path} is a .pt2 archive but not an xquant_fx package (no extra/{METADATA_FILE}); "
            "export it with xquant_fx.aoti"
        )
    return names[0]


def verify_package(path) -> dict:
    """Check a package against the checksum manifest :func:`export` wrote into it, reading every
    member once (no code of the package is loaded); returns the manifest.

    Raises :class:`PackageError` (a ``ValueError``) naming the first problem: a member whose bytes
    fail their zip CRC-32 or SHA-256, or whose size differs; a member the manifest does not list, a
    listed member that is missing, a name present twice; a package without a manifest (written
    before xquant_fx added them: re-export it, or ``load(..., verify=False)`` if you trust it).
    Checksums detect corruption (a bad disk, a truncated or altered copy), not malice: whoever can
    change the package can rewrite its manifest too (see :func:`load`, "Trust")."""
    path = _check_archive_path(path)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PackageError(f"{path} holds the member(s) {twice[:3]} more than once: a damaged or altered "
                               "package (a loader could read either copy)")
        meta_name = _metadata_member(infos, path)
        manifest_name = meta_name.rsplit("/", 1)[0] + "/" + MANIFEST_FILE
        if manifest_name not in names:
            raise PackageError(
                f"{path} has no checksum manifest (extra/{MANIFEST_FILE}): it was written by an xquant_fx "
                "before packages carried one, or the manifest was removed. Export it again with this xquant_fx; "
                "if you trust this file as it is, load(path, verify=False) skips the check"
            )
        try:
            manifest = json.loads(archive.read(manifest_name).decode())
            listed = manifest["members"]
            if manifest.get("algorithm") != "sha256" or not isinstance(listed, dict):
                raise ValueError(f"algorithm {manifest.get('algorithm')!r}")
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise PackageError(f"{path} is damaged: its checksum manifest is unreadable ({err})") from None
        unlisted = [n for n in names if n != manifest_name and n not in listed]
        if unlisted:
            raise PackageError(f"{path} holds member {unlisted[0]!r}, which its checksum manifest does not list: "
                               "the package was changed after export")
        missing = sorted(set(listed) - set(names))
        if missing:
            raise PackageError(f"{path} lacks member {missing[0]!r}, which its checksum manifest lists: "
                               "the package was changed after export")
        for info in infos:
            if info.filename == manifest_name:
                continue
            want = listed[info.filename]
            if info.file_size != want.get("size"):
                raise PackageError(f"{path} is damaged: member {info.filename!r} has {info.file_size} bytes, "
                                   f"its checksum manifest says {want.get('size')}")
            if _member_digest(archive, info, path) != want.get("sha256"):
                raise PackageError(f"{path} is damaged: member {info.filename!r} does not match its SHA-256 in the "
                                   "checksum manifest; the file was corrupted or changed after export")
    return manifest


# ============================================================================ C++ runtime (CUDA)
_SHT_DYNSYM, _SHT_VERNEED, _SHT_VERSYM = 11, 0x6FFFFFFE, 0x6FFFFFFF
_PRELOAD_FIX = "LD_PRELOAD=$(readlink -f $(g++ -print-file-name=libstdc++.so.6))"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def _elf_cxx_imports(data: bytes) -> tuple[list[str], tuple[int, ...] | None]:
    """The undefined dynamic symbols an ELF64 little-endian shared object takes from libstdc++ (by
    their symbol versions), and the highest ``GLIBCXX`` version it needs. Reads the tables only;
    raises ``ValueError`` (or ``struct.error``) for what it cannot parse."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def table(index: int) -> bytes:
        return data[sections[index][4] : sections[index][4] + sections[index][5]]

    def cstr(strings: bytes, at: int) -> str:
        return strings[at : strings.index(b"\0", at)].decode(errors="replace")

    by_type = {}
    for sec in sections:
        by_type.setdefault(sec[1], sec)
    dynsym = by_type.get(_SHT_DYNSYM)
    if dynsym is None:
        raise ValueError("no dynamic symbol table")
    versym, verneed = by_type.get(_SHT_VERSYM), by_type.get(_SHT_VERNEED)
    cxx_versions: dict[int, str] = {}  # version index -> "GLIBCXX_3.4.21" / "CXXABI_1.3" of libstdc++
    if verneed is not None:
        strings, offset = table(verneed[6]), verneed[4]
        for _ in range(verneed[7]):
            _, count, file_at, aux_at, next_at = struct.unpack_from("<HHIII", data, offset)
            aux = offset + aux_at
            for _ in range(count):
                _, _, index, name_at, aux_next = struct.unpack_from("<IHHII", data, aux)
                if cstr(strings, file_at).startswith("libstdc++"):
                    cxx_versions[index] = cstr(strings, name_at)
                aux += aux_next
            if not next_at:
                break
            offset += next_at
    names = table(dynsym[6])
    symbols = []
    for i in range(1, dynsym[5] // 24):
        name_at, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, dynsym[4] + 24 * i)
        if shndx != 0 or not name_at or versym is None:
            continue
        if struct.unpack_from("<H", data, versym[4] + 2 * i)[0] & 0x7FFF in cxx_versions:
            symbols.append(cstr(names, name_at))
    needed = max((_version_tuple(v) for v in cxx_versions.values() if v.startswith("GLIBCXX_")), default=None)
    return symbols, needed


_GLIBCXX_CACHE: dict[str, tuple[int, ...] | None] = {}


def _glibcxx_of(library: str) -> tuple[int, ...] | None:
    """The highest ``GLIBCXX_x.y.z`` version a libstdc++ file defines (read from its bytes)."""
    if library not in _GLIBCXX_CACHE:
        try:
            data = Path(library).read_bytes()
        except OSError:
            _GLIBCXX_CACHE[library] = None
        else:
            found = [_version_tuple(m.decode()) for m in re.findall(rb"GLIBCXX_\d+\.\d+(?:\.\d+)?(?=\x00)", data)]
            _GLIBCXX_CACHE[library] = max(found, default=None)
    return _GLIBCXX_CACHE[library]


def _dotted(version) -> str:
    return ".".join(map(str, version)) if version else "?"


def _compiler_cxx_runtime() -> dict | None:
    """The C++ runtime Inductor's compiler links against (recorded at export; names the fix)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001 - no compiler here: nothing to record
        return None
    if not os.path.isabs(out) or not os.path.exists(out):
        return {"compiler": cxx, "library": None, "glibcxx": None}
    library = os.path.realpath(out)
    return {"compiler": cxx, "library": library, "glibcxx": _dotted(_glibcxx_of(library))}


def _mapped_cxx_runtimes() -> list[str] | None:
    """The libstdc++ files mapped into this process (``None`` where ``/proc/self/maps`` is absent)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = set()
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libstdc++.so"):
            found.add(os.path.realpath(fields[5].strip()))
    return sorted(found)


def _symbol_providers(symbols) -> dict[str, str] | None:
    """``symbol -> library`` for each symbol the dynamic linker's default scope (the process's
    global symbols) already defines; symbols it does not define are left out (a package's ``.so``
    then binds them to its own ``libstdc++`` dependency). ``None`` without ``dlsym``/``dladdr``."""
    import ctypes

    class _DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        process = ctypes.CDLL(None)
        dlsym, dladdr = process.dlsym, process.dladdr
    except (OSError, AttributeError):
        return None
    dlsym.argtypes, dlsym.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
    providers = {}
    for name in symbols:
        address = dlsym(None, name.encode())  # RTLD_DEFAULT
        info = _DlInfo()
        if address and dladdr(address, ctypes.byref(info)) and info.dli_fname:
            providers[name] = os.path.realpath(info.dli_fname.decode(errors="replace"))
    return providers


def _preload_hint(meta: dict | None) -> str:
    local = _compiler_cxx_runtime() or {}
    library = local.get("library") or ((meta or {}).get("cxx_runtime") or {}).get("library")
    exact = f"LD_PRELOAD={library} " if library and os.path.exists(library) else ""
    return (f"start Python with the compiler's C++ runtime loaded first: {exact or _PRELOAD_FIX + ' '}python ..."
            + (f" (generally: {_PRELOAD_FIX})" if exact else ""))


def check_cxx_runtime(path, meta: dict | None = None) -> dict:
    """Whether this process can load the CUDA package at ``path`` without the C++ runtime symbol
    clash that crashes torch's loader (see :func:`load`, ``runtime_check``). Returns a report
    (``verdict``: ``"ok"`` or ``"trial-ok"``, the symbols, libraries and versions looked at);
    raises :class:`PackageError` naming the clash and the ``LD_PRELOAD`` fix."""
    meta = meta if meta is not None else read_metadata(path)
    report: dict = {"verdict": None, "symbols": 0, "needed": None, "mapped": None, "foreign": {}}
    symbols: set[str] = set()
    needed = None
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if "/aotinductor/" in name and name.endswith(".so"):
                    found, version = _elf_cxx_imports(archive.read(name))
                    symbols.update(found)
                    needed = max(filter(None, (needed, version)), default=None)
    except (ValueError, struct.error, IndexError, zipfile.BadZipFile) as err:
        report["inconclusive"] = f"cannot read the package's C++ imports ({err})"
        symbols = set()
    report["symbols"], report["needed"] = len(symbols), _dotted(needed) if needed else None
    mapped = _mapped_cxx_runtimes()
    providers = _symbol_providers(sorted(symbols)) if symbols else None
    report["mapped"] = mapped
    if report.get("inconclusive") or mapped is None or providers is None or not symbols:
        report.setdefault("inconclusive", "cannot inspect this process's C++ runtime")
        return _trial_load(path, meta, report)
    problems = []
    foreign = {s: lib for s, lib in providers.items() if not os.path.basename(lib).startswith("libstdc++")}
    report["foreign"] = foreign
    if foreign:
        by_lib: dict[str, list[str]] = {}
        for sym, lib in foreign.items():
            by_lib.setdefault(lib, []).append(sym)
        lib, syms = max(by_lib.items(), key=lambda kv: len(kv[1]))
        problems.append(f"{len(foreign)} of the {len(symbols)} C++ runtime symbols its code imports would bind to "
                        f"copies in {sorted(by_lib)} instead of libstdc++ (e.g. {syms[0]} from {lib})")
    # the runtime the package's imports bind to: the global provider, else (none is global) its own
    # libstdc++.so.6 dependency, which resolves to a runtime already mapped under that name
    runtimes = sorted((set(providers.values()) - set(foreign.values())) or set(mapped))
    report["runtimes"] = runtimes
    for lib in runtimes:
        have = _glibcxx_of(lib)
        if needed and have and have < needed:
            problems.append(f"{lib} defines GLIBCXX up to {_dotted(have)}; the package's code needs {_dotted(needed)}")
    if problems:
        raise PackageError(f"loading the CUDA package {path} here would crash torch's loader or fail in it (a C++ "
                           "runtime clash; a crash there cannot be caught from Python): " + "; ".join(problems)
                           + ". Fix: " + _preload_hint(meta) + ". load(..., runtime_check=False) skips this check")
    report["verdict"] = "ok"
    return report


_TRIAL = """
import json, sys
import torch
if sys.argv[3] == "ops":  # the package calls xquant:: ops: register them first, as load() does
    import xquant_fx.ops
from torch.export.pt2_archive._package import load_pt2
load_pt2(sys.argv[1], **json.loads(sys.argv[2]))
print("loaded")
"""


def _trial_load(path, meta: dict, report: dict) -> dict:
    """Load the package once in a child process (where a crash is reported, not inherited)."""
    import signal

    from torch.export.pt2_archive._package import load_pt2

    kwargs = {}
    accepts = set(inspect.signature(load_pt2).parameters)
    if meta.get("device") == "cuda" and "device_index" in accepts:
        kwargs["device_index"] = torch.cuda.current_device()
    if meta.get("weights") == "on_disk" and "load_weights_from_disk" in accepts:
        kwargs["load_weights_from_disk"] = True
    ops = "ops" if meta.get("runtime_ops") else "-"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-c", _TRIAL, str(path), json.dumps(kwargs), ops], capture_output=True,
                           text=True, timeout=1800, env=env)
    report["trial_returncode"] = child.returncode
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = ""
        raise PackageError(f"loading the CUDA package {path} in a child process ended with signal {-child.returncode} "
                           f"{name} in torch's loader ({report['inconclusive']}, so it was tried there first); the "
                           "known cause is a C++ runtime clash. Fix: " + _preload_hint(meta)
                           + ". load(..., runtime_check=False) skips this check")
    if child.returncode != 0:  # an ordinary error: the load below raises it with its message
        logger.warning("xquant_fx: trial load of %s failed: %s", path, child.stderr.strip()[-500:])
    report["verdict"] = "trial-ok" if child.returncode == 0 else "trial-error"
    return report


# ============================================================================ load
def _check_archive_path(path) -> Path:
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"no package at {path}")
    if not path.is_file():
        raise PackageError(f"{path} is not a file (an xquant_fx package is one .pt2 file)")
    if not zipfile.is_zipfile(path):
        raise PackageError(f"{path} is not an AOTInductor package (.pt2 archive): not a zip file")
    return path


def read_metadata(path) -> dict:
    """The metadata of an xquant_fx package, read from the archive without loading any model.

    Raises ``FileNotFoundError`` for a missing file and :class:`PackageError` for a file that is
    not an xquant_fx package."""
    path = _check_archive_path(path)
    with zipfile.ZipFile(path) as archive:
        name = _metadata_member(archive.infolist(), path)
        try:
            meta = json.loads(archive.read(name).decode())
        except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PackageError(f"{path}: unreadable xquant_fx metadata ({err})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{path} has package format {version!r}; this xquant_fx reads format {FORMAT_VERSION}: re-export it"
        )
    return meta


def load(
    path,
    *,
    config: XQuantConfig | str | None = None,
    max_cache_len: int | None = None,
    batch_size: int | None = None,
    device=None,
    verify: bool = True,
    runtime_check: bool = True,
) -> "ExportedLM":
    """Open a package written by :func:`export`.

    ``config``, ``max_cache_len``, ``batch_size`` and ``device`` are optional expectations: when
    given and the package was exported otherwise, :class:`PackageError` says what differs (a
    package's shapes are fixed at export). ``device`` may name a CUDA device index (``"cuda:1"``).

    Trust: a ``.pt2`` package contains native code (the compiled ``.so`` of each program), which
    runs with your process's rights as soon as it is loaded. Load only packages you would run as a
    program: ones you exported yourself or got from someone you trust, over a channel you trust.
    Integrity: with ``verify=True`` (default) every member is read and checked against the SHA-256
    manifest that :func:`export` wrote into the package (and its zip CRC-32) *before* any native
    code is loaded; a damaged package raises :class:`PackageError` (a ``ValueError``) naming the
    bad member (:func:`verify_package`). These checksums detect corruption (a bad disk or copy, a
    truncated download), not malice: whoever can change the package can rewrite its manifest too.
    A package written before packages carried a manifest is refused with the way out: export it
    again, or pass ``verify=False`` if you trust the file (that skips every checksum; reading the
    members costs 1-2 s per GB on one core).

    CUDA packages and the C++ runtime (``runtime_check=True``, CUDA only; CPU loading is
    unchanged): a package's ``.so`` binds the C++ runtime symbols it imports (``std::regex``,
    locales, streams) in this process. Where another library of the process exports its own copy
    of those symbols ahead of ``libstdc++``, or the ``libstdc++`` this process has mapped is older
    than the package needs, torch's loader crashes with a segmentation fault inside the package's
    code (seen with torch 2.11 on the H200 machine's image), which no Python code can catch. So
    before loading, :func:`load` reads the package's imported C++ symbols and their versions from
    its ``.so`` (ELF tables; nothing is executed), asks the dynamic linker which library each
    would bind to, and compares versions with the ``libstdc++`` this process mapped; that takes
    milliseconds. On a clash it raises :class:`PackageError` naming the library and the fix, to
    start Python with the compiler's C++ runtime first:
    ``LD_PRELOAD=$(readlink -f $(g++ -print-file-name=libstdc++.so.6)) python ...``. Only when
    that inspection is impossible (no ``/proc/self/maps``, no ``dlsym``/``dladdr``, an ``.so``
    it cannot parse) does it load the package once in a child process first, where a crash is
    reported instead of inherited (seconds). ``runtime_check=False`` skips all of it. Why not
    always the child process: it costs a second full load (weights included) on every call, for a
    clash the symbol tables already show. Not yet verified on the H200 image itself (tested on CPU
    with simulated clashes; ``benchmarks/check_export_cuda.py`` checks it there): on that image,
    use the ``LD_PRELOAD`` line regardless.
    """
    path = _check_archive_path(path)
    if verify:
        verify_package(path)
    meta = read_metadata(path)
    problems = []
    if config is not None:
        want = config_to_dict(_resolve_config(config))
        have = meta["config"]
        diffs = [f"{k}={have.get(k)!r} (requested {v!r})" for k, v in want.items() if k != "name" and have.get(k) != v]
        if diffs:
            problems.append(f"config {have.get('name')!r} differs from the requested {want['name']!r}: "
                            + ", ".join(diffs))
    if max_cache_len is not None and max_cache_len != meta["max_cache_len"]:
        problems.append(f"max_cache_len={meta['max_cache_len']} (requested {max_cache_len})")
    if batch_size is not None and batch_size != meta["batch_size"]:
        problems.append(f"batch_size={meta['batch_size']} (requested {batch_size})")
    want_device = torch.device(device) if device is not None else torch.device(meta["device"])
    if want_device.type != meta["device"]:
        problems.append(f"device {meta['device']} (requested {want_device.type})")
    if problems:
        raise PackageError(f"{path} was exported with " + "; ".join(problems) + ": re-export it with those settings")
    if meta["device"] == "cuda" and not torch.cuda.is_available():
        raise PackageError(f"{path} is a CUDA package and this machine has no usable CUDA device")
    if meta["device"] == "cuda" and runtime_check:
        check_cxx_runtime(path, meta)
    if meta.get("runtime_ops"):
        from . import ops  # noqa: F401

        missing = [op for op in meta["runtime_ops"] if not hasattr(torch.ops.xquant, op.split("::")[1])]
        if missing:
            raise PackageError(f"{path} calls {missing}, which this xquant_fx does not register: re-export it")
    return ExportedLM(path, meta, want_device)


class ExportedLM:
    """A package loaded for generation: the decode (and prefill) programs sharing one cache.

    Attributes: ``metadata`` (what :func:`export` recorded), ``batch_size``, ``max_cache_len``,
    ``max_prompt_len`` (0: no prefill program), ``device``, ``state`` (the cache tensors,
    ``"layer.name" -> tensor``), ``last_timing`` (seconds of the last :meth:`generate`: ``prefill_s``,
    ``decode_s``, ``decode_steps``).
    """

    def __init__(self, path, meta: dict, device: torch.device):
        from torch.export.pt2_archive._package import load_pt2

        self.path = str(path)
        self.metadata = meta
        self.batch_size = meta["batch_size"]
        self.max_cache_len = meta["max_cache_len"]
        self.max_prompt_len = meta["max_prompt_len"]
        self.vocab_size = meta["vocab_size"]
        #: Token ids the programs accept: ``0 .. input_vocab_size - 1`` (rows of the input embedding).
        self.input_vocab_size = meta.get("input_vocab_size", self.vocab_size)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        accepts = set(inspect.signature(load_pt2).parameters)
        kwargs = {}
        if device.type == "cuda" and "device_index" in accepts:
            kwargs["device_index"] = device.index
        if meta.get("weights") == "on_disk":
            if "load_weights_from_disk" not in accepts:
                raise PackageError(f"{self.path} keeps its weights beside the models, which this torch "
                                   f"({torch.__version__}) cannot load; re-export it with this torch")
            kwargs["load_weights_from_disk"] = True
        try:
            contents = load_pt2(self.path, **kwargs)
        except Exception as err:
            raise PackageError(f"AOTInductor could not load {self.path}: {err}") from err
        self._runners = contents.aoti_runners
        wanted = set(meta["constants"])
        if set(self._runners) != wanted:
            raise PackageError(f"{self.path} holds models {sorted(self._runners)}, its metadata names {sorted(wanted)}")
        self.state = {
            key: torch.zeros(spec["shape"], dtype=_DTYPES[spec["dtype"]], device=device)
            for key, spec in meta["state"].items()
        }
        for name, fqns in meta["constants"].items():
            runner = self._runners[name]
            known = set(runner.get_constant_fqns())
            absent = sorted(set(fqns) - known)
            if absent:
                raise PackageError(f"model {name!r} of {self.path} lacks the cache constants {absent[:4]}")
            runner.load_constants({fqn: self.state[key] for fqn, key in fqns.items()},
                                  check_full_update=False, user_managed=True)
        # Position inputs, sliced rather than built per step (no host-to-device copy on CUDA).
        self._positions = torch.arange(self.max_cache_len + 1, dtype=torch.long, device=device)
        self._position = 0
        self.last_timing: dict = {}

    @property
    def config(self) -> XQuantConfig:
        """The :class:`XQuantConfig` the package's cache was exported with."""
        return config_from_dict(self.metadata["config"])

    def __repr__(self) -> str:
        m = self.metadata
        return (f"ExportedLM({self.path!r}: {m['model_class']}, {m['config']['name']}, {m['device']} {m['dtype']}, "
                f"batch {self.batch_size}, max_cache_len {self.max_cache_len}, "
                f"programs {sorted(self._runners)}, {self.position} tokens stored)")

    # ------------------------------------------------------------------ programs
    def _run(self, name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
        runner = self._runners[name]
        loader = getattr(runner, "loader", None)
        out = loader.boxed_run(inputs) if loader is not None else runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out

    def _check_ids(self, ids, what: str) -> torch.Tensor:
        if not torch.is_tensor(ids) or ids.dim() != 2:
            shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"{what} must be token ids of shape [batch, length], got {shape}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must be integer token ids, got {ids.dtype}")
        if ids.shape[0] != self.batch_size:
            raise ValueError(
                f"{what} has batch {ids.shape[0]} but the package was exported for batch {self.batch_size} "
                "(shapes are fixed at export)"
            )
        if ids.numel():
            # the compiled programs index the embedding without bounds checks: refuse here, before they run
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.input_vocab_size:
                bad = low if low < 0 else high
                where = tuple(int(i) for i in (ids == bad).nonzero()[0])
                raise ValueError(f"{what} holds token id {bad} at {list(where)}, outside the model's vocabulary "
                                 f"of {self.input_vocab_size} ids (0..{self.input_vocab_size - 1})")
        return ids.to(device=self.device, dtype=torch.long).contiguous()

    def reset(self) -> None:
        """Forget every stored token (zero the cache)."""
        for t in self.state.values():
            t.zero_()
        self._position = 0

    @property
    def position(self) -> int:
        """Tokens stored per sequence."""
        return self._position

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with the prompt ``input_ids [B, L]``; returns the logits ``[B, V]``
        of its last token. Up to ``max_prompt_len`` tokens go through the prefill program at once,
        the rest (or all, without a prefill program) through the decode program one at a time."""
        return self._prefill(self._check_ids(input_ids, "input_ids"))

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length < 1:
            raise ValueError("the prompt is empty")
        if length > self.max_cache_len:
            raise ValueError(f"a prompt of {length} tokens does not fit max_cache_len={self.max_cache_len}")
        self.reset()
        done = 0
        logits = None
        if self.max_prompt_len:
            done = min(length, self.max_prompt_len)
            padded = ids.new_zeros(self.batch_size, self.max_prompt_len)
            padded[:, :done] = ids[:, :done]
            logits = self._run(PREFILL, [padded, self._positions[done : done + 1]])
            self._position = done
        for i in range(done, length):
            logits = self._step(ids[:, i : i + 1])
        return logits

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Store one token per sequence (``[B]`` or ``[B, 1]``) at the next position; returns its
        logits ``[B, V]``."""
        if torch.is_tensor(token_ids) and token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        ids = self._check_ids(token_ids, "token_ids")
        if ids.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got {ids.shape[1]}")
        return self._step(ids)

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`step` on checked ids ``[B, 1]`` (generate's own tokens: argmax of the logits)."""
        p = self._position
        if p >= self.max_cache_len:
            raise ValueError(f"the cache is full: {p} tokens stored, max_cache_len={self.max_cache_len}")
        # contiguous: the compiled program assumes the example's strides (a column slice of a prompt is not)
        logits = self._run(DECODE, [ids.contiguous(), self._positions[p : p + 1]])
        self._position = p + 1
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        eos_token_id=_FROM_PACKAGE,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy generation: the prompt ``[B, L]`` followed by up to ``max_new_tokens`` tokens.

        Like transformers' greedy ``generate``: generation stops when every sequence has produced
        an eos token, and a finished sequence continues with ``pad_token_id``. ``eos_token_id``
        (an int or a list) defaults to the model's, recorded at export; ``None`` never stops early.
        """
        ids = self._check_ids(input_ids, "input_ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        needed = ids.shape[1] + max_new_tokens - 1  # the last new token is returned, never stored
        if needed > self.max_cache_len:
            raise ValueError(
                f"a {ids.shape[1]}-token prompt and {max_new_tokens} new tokens need {needed} cache positions; "
                f"the package was exported with max_cache_len={self.max_cache_len}"
            )
        eos = self.metadata["eos_token_id"] if eos_token_id is _FROM_PACKAGE else _token_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.metadata.get("pad_token_id")
        if eos and pad is None:
            pad = eos[0]
        if eos and not 0 <= pad < self.input_vocab_size:
            raise ValueError(f"pad_token_id {pad} is outside the model's vocabulary of {self.input_vocab_size} ids")
        eos_t = torch.tensor(eos, device=self.device) if eos else None
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        sync()
        start = time.perf_counter()
        logits = self._prefill(ids)
        token = logits.argmax(-1)
        sync()
        prefill_s = time.perf_counter() - start
        out = [token]
        unfinished = None
        if eos_t is not None:
            unfinished = ~torch.isin(token, eos_t)
        start = time.perf_counter()
        steps = 0
        for _ in range(max_new_tokens - 1):
            if unfinished is not None and not bool(unfinished.any()):
                break
            token = self._step(token[:, None]).argmax(-1)
            steps += 1
            if unfinished is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                unfinished &= ~torch.isin(token, eos_t)
            out.append(token)
        sync()
        self.last_timing = {"prefill_s": prefill_s, "decode_s": time.perf_counter() - start, "decode_steps": steps}
        return torch.cat([ids, torch.stack(out, 1)], 1)


# ============================================================================ inspection
def inspect_package(path) -> dict:
    """What a package contains, from the archive alone: ``metadata``, and per model its files,
    the xquant Triton kernels its compiled code launches (``xquant_kernels``), the number of GPU
    kernel binaries (``kernel_binaries``) and whether it calls an ``xquant::`` op (``xquant_ops``)."""
    meta = read_metadata(path)
    models: dict[str, dict] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            try:
                i = parts.index("aotinductor")
            except ValueError:
                continue
            if len(parts) < i + 3:
                continue
            model = models.setdefault(parts[i + 1], {"files": [], "xquant_kernels": set(), "kernel_binaries": 0,
                                                     "xquant_ops": set()})
            fname = parts[-1]
            model["files"].append(fname)
            if fname.endswith((".cubin", ".fatbin", ".hsaco", ".spv")):
                model["kernel_binaries"] += 1
            if fname.endswith((".cpp", ".json", ".h")):
                text = archive.read(name).decode(errors="ignore")
                model["xquant_kernels"].update(k for k in XQUANT_KERNELS if k in text)
                model["xquant_ops"].update(op for op in ("append_token", "attend", "read_keys", "read_values")
                                           if f"xquant::{op}" in text)
            if fname.endswith((".cubin", ".fatbin")):
                model["xquant_kernels"].update(k for k in XQUANT_KERNELS if k in fname)
    for model in models.values():
        model["xquant_kernels"] = sorted(model["xquant_kernels"])
        model["xquant_ops"] = sorted(model["xquant_ops"])
    return {"metadata": meta, "models": models}
