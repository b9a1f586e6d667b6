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

CI (``tests/aoti/test_export.py``) runs the CPU column; ``benchmarks/check_export_cuda.py`` checks the
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

Modules: :mod:`.capture` (``export``), :mod:`.package` (format, metadata, checksums, inspection),
:mod:`.cxx_runtime` (the CUDA C++ runtime check), :mod:`.runtime` (``load`` and :class:`ExportedLM`).
``from xquant_fx.aoti.runtime import load`` runs a package without importing the capture code.
"""

from .capture import export
# The private helpers are probed by benchmarks/check_export_cuda.py on a GPU machine.
from .cxx_runtime import (_compiler_cxx_runtime, _dotted, _elf_cxx_imports, _glibcxx_of, _mapped_cxx_runtimes,
                          _symbol_providers, check_cxx_runtime)
from .package import (FORMAT_VERSION, MANIFEST_FILE, METADATA_FILE, XQUANT_KERNELS, PackageError, config_from_dict,
                      config_to_dict, inspect_package, read_metadata, verify_package)
from .runtime import ExportedLM, load

__all__ = [
    "FORMAT_VERSION", "MANIFEST_FILE", "METADATA_FILE", "XQUANT_KERNELS", "ExportedLM", "PackageError",
    "_compiler_cxx_runtime", "_dotted", "_elf_cxx_imports", "_glibcxx_of", "_mapped_cxx_runtimes", "_symbol_providers",
    "check_cxx_runtime", "config_from_dict", "config_to_dict", "export", "inspect_package", "load", "read_metadata",
    "verify_package",
]
