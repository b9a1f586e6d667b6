"""The ``xquant`` torch.compile backend: the graph passes of :mod:`xquant_fx.passes`, then Inductor.

Registered under the name ``"xquant"`` when :mod:`xquant_fx` is imported, and through the
``torch_dynamo_backends`` entry point (so ``torch.compile(model, backend="xquant")`` also works in
a process that never imported the package). ``mode`` and ``options`` are passed through to
Inductor (``mode="reduce-overhead"`` gives CUDA graphs), except the backend's own options:

* ``moe_top_k``, ``moe_renormalize``, ``moe_min_weight``, ``moe_top_p`` (as in
  :class:`xquant_fx.XQuantConfig`), or ``moe_plan`` (what :func:`xquant_fx.optimize` passes): the
  expert pruning of :mod:`xquant_fx.passes.prune_moe_router`;
* ``xquant_verbose``: print the passes' hits for every graph compiled;
* ``xquant_inline_kernels``: whether Inductor traces into the ``xquant::`` ops (below); default:
  not under CUDA graphs (``reduce-overhead``, ``max-autotune``), yes otherwise;
* ``mode``: as torch.compile's ``mode`` (which torch.compile does not take together with options).

Inductor caches compiled graphs on disk, keyed by the graph it is given, and that graph names the
``xquant::`` ops without their bodies: after an upgrade or edit of this package, a cached graph
would still run the old ops (checked: a changed ``triton_op`` body is not seen). So the backend,
and :func:`xquant_fx.export`, hand Inductor a no-op post-grad pass whose ``uuid`` is a hash of this
package's sources (:func:`source_stamp`); Inductor puts that uuid into its cache keys. A user's own
``post_grad_custom_pre_pass`` is left in place (and the stamp is then not added).

Compile time, and the ops as opaque calls: the ``xquant::`` ops are ``triton_op`` ops, which
Inductor normally traces into (their Python launch code runs under fake tensors, twice, once per
call site: 64 sites in a 32-layer decode step) so that it can launch the Triton kernels itself.
Under CUDA graphs that buys nothing at run time: the launch code runs once, at capture, and the
replay is the same kernels either way. So with CUDA graphs the backend compiles with
``torch._functorch.config.decompose_custom_triton_ops`` off (the switch ``torch.export`` uses to
keep them whole): each op stays one extern call, its register_fake gives the shapes, and its
declared mutations are reinplaced on the cache buffers like any in-place op (no copies: checked in
the tests on the generated code). Without CUDA graphs the launch code would run every step, so
there Inductor inlines the kernels. ``xquant_fx.export`` always inlines (AOTInductor must embed the
kernels). ``options={"xquant_inline_kernels": ...}`` overrides the choice.

When the kernels are inlined: for every launch of a user-defined Triton kernel in a graph, Inductor asks Triton
for the kernel's TTIR and walks it to learn which tensor arguments the launch writes, twice (while
tracing with fake tensors and while lowering). A decode step launches the same few ``xquant``
kernels with the same constants in every layer, so a 32-layer step repeated that analysis ~250
times. :func:`memoized_kernel_analysis` keys it by what the TTIR depends on (the kernel, its
constants and scalars, its tensors' dtypes; ``generate_ttir`` itself replaces tensors by dtype
and symbolic sizes by a placeholder) and computes it once per key, for this package's kernels only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from pathlib import Path

import torch

from .moe import plan_from_options
from .passes import PassContext, PassReport, run_passes

logger = logging.getLogger(__name__)

#: Hits of every pass over every graph this process compiled with the backend.
REPORT = PassReport()


def source_hash(root: Path) -> str:
    """SHA-256 over the relative paths and contents of every ``.py`` file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp_pass(stamp: str):
    """A post-grad pass that changes nothing; its ``uuid`` keys Inductor's caches to ``stamp``.
    (Built on first use: importing Inductor's pass base class imports triton, which ``import
    xquant_fx`` must not.)"""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class SourceStamp(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return stamp

    return SourceStamp()


@functools.cache
def source_stamp():
    """The no-op pass whose uuid is the hash of the ``xquant_fx`` sources (module docstring)."""
    return stamp_pass(source_hash(Path(__file__).resolve().parent))


def with_source_stamp(patches: dict) -> dict:
    """Inductor config patches plus the source stamp, unless a pre-pass is already configured."""
    if patches.get("post_grad_custom_pre_pass") is None and torch._inductor.config.post_grad_custom_pre_pass is None:
        patches = {**patches, "post_grad_custom_pre_pass": source_stamp()}
    return patches


#: Accesses found per (kernel, argument signature): see the module docstring.
_KERNEL_ACCESSES: dict = {}
#: The analysis function's name across torch versions.
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")


def _analysis_key(kernel, kwargs: dict, tma_metadata) -> tuple | None:
    """What the TTIR of ``kernel`` launched with ``kwargs`` depends on, or None (no memo: not
    one of this package's kernels, TMA descriptors, or an argument of a kind not known here)."""
    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
    if tma_metadata or not getattr(fn, "__module__", "").startswith(__package__ + "."):
        return None
    parts = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            parts.append((name, "sym"))
        elif isinstance(value, torch.Tensor):
            parts.append((name, "tensor", value.dtype))
        elif hasattr(value, "get_dtype") and hasattr(value, "get_size"):  # Inductor's TensorBox
            parts.append((name, "tensor", value.get_dtype()))
        elif value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
            parts.append((name, type(value).__name__, value))
        elif type(value).__module__.startswith("triton"):  # constexpr dtypes
            parts.append((name, "triton", repr(value)))
        else:
            return None
    return (kernel, tuple(parts))


@contextlib.contextmanager
def memoized_kernel_analysis():
    """Within the block, Inductor's per-launch TTIR analysis of this package's Triton kernels is
    computed once per :func:`_analysis_key` (module docstring)."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:  # no triton: nothing to analyse
        yield
        return
    name = next((n for n in _ANALYSES if hasattr(wrap, n)), None)
    if name is None:
        yield
        return
    original = getattr(wrap, name)

    def analysis(kernel, kwargs, *args, **kw):
        key = _analysis_key(kernel, kwargs, args[0] if args else kw.get("tma_descriptor_metadata"))
        if key is None:
            return original(kernel, kwargs, *args, **kw)
        if key not in _KERNEL_ACCESSES:
            _KERNEL_ACCESSES[key] = original(kernel, kwargs, *args, **kw)
        found = _KERNEL_ACCESSES[key]
        return list(found) if isinstance(found, list) else found  # older torch: names, a list its caller owns

    setattr(wrap, name, analysis)
    try:
        yield
    finally:
        setattr(wrap, name, original)


def xquant(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None, **_):
    """Backend entry point: ``torch.compile(model, backend="xquant", mode=..., options=...)``."""
    from . import ops  # noqa: F401  (registers the xquant:: ops the passes emit)

    patches = dict(options or {})
    mode = mode or patches.pop("mode", None)  # torch.compile refuses mode and options together
    verbose = bool(patches.pop("xquant_verbose", False))
    inline = patches.pop("xquant_inline_kernels", None)
    ctx = PassContext(moe=plan_from_options(patches))
    graph_report = PassReport()
    run_passes(gm, graph_report, ctx=ctx)
    REPORT.graphs += 1
    for name, hits in graph_report.hits.items():
        REPORT.add(name, hits)
    logger.info("%s", graph_report)
    if verbose:
        print(f"[xquant] graph {REPORT.graphs}: " + ", ".join(f"{n} {h}" for n, h in graph_report.hits.items()))
    from torch._inductor.compile_fx import compile_fx

    if mode and mode != "default":
        patches = {**torch._inductor.list_mode_options(mode), **patches}
    if inline is None:
        inline = not patches.get("triton.cudagraphs", False)
    with memoized_kernel_analysis(), _kernels_inlined(bool(inline)):
        return compile_fx(gm, example_inputs, config_patches=with_source_stamp(patches))


def _kernels_inlined(inline: bool):
    """Within the block, AOTAutograd traces into the ``triton_op`` ops (``inline``) or keeps each
    one whole (module docstring). A torch without the switch always inlines."""
    config = torch._functorch.config
    if inline or not hasattr(config, "decompose_custom_triton_ops"):
        return contextlib.nullcontext()
    return config.patch(decompose_custom_triton_ops=False)


def register() -> None:
    """Make ``backend="xquant"`` resolvable by name.

    When the package is installed, its ``torch_dynamo_backends`` entry point does this lazily and
    registering here as well would make torch's entry-point loading fail on a duplicate name; so
    this registers only when no entry point is installed (a source checkout on ``sys.path``).
    """
    from importlib.metadata import entry_points

    if entry_points(group="torch_dynamo_backends", name="xquant"):
        return
    from torch._dynamo.backends import registry

    if "xquant" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=xquant, name="xquant")
