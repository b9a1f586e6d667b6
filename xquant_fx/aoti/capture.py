"""Capture: ``export(model, ...)`` traces the decode and prefill programs over the quantized cache,
compiles them with AOTInductor and writes the package (layout and rules: :mod:`xquant_fx.aoti`)."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from ..config import XQuantConfig
from ..hf import cache_argument, check_causal_lm, text_config
from .cxx_runtime import _compiler_cxx_runtime
from .package import (DECODE, FORMAT_VERSION, METADATA_FILE, PREFILL, _add_manifest, _resolve_config, _token_ids,
                      config_to_dict)

logger = logging.getLogger(__name__)


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
    from .. import ops  # noqa: F401  (registers the xquant:: ops the graphs call)
    from ..cache import XQuantCache, XQuantLayer

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
    check_causal_lm(model, "export")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generation_config"):
        raise ValueError(f"{type(model).__name__} is not a transformers causal LM (no `generation_config`)")


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
    return int(text_config(model.config).vocab_size)


def _input_vocab_size(model, default: int) -> int:
    """Rows of the input embedding: the token ids a package accepts are ``0 .. rows - 1``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if torch.is_tensor(weight) and weight.dim() == 2 else default


def _package_version() -> str:
    from ..version import __version__

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
    from ..passes import PassReport, run_passes

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
    from .. import quant

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
    from ..backend import with_source_stamp

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
