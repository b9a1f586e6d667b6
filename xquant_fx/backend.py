"""The ``xquant`` torch.compile backend: the graph passes of :mod:`xquant_fx.passes`, then Inductor.

Registered under the name ``"xquant"`` when :mod:`xquant_fx` is imported, and through the
``torch_dynamo_backends`` entry point (so ``torch.compile(model, backend="xquant")`` also works in
a process that never imported the package). ``mode`` and ``options`` are passed through to
Inductor (``mode="reduce-overhead"`` gives CUDA graphs), except the backend's own options:

* ``moe_top_k``, ``moe_renormalize``, ``moe_min_weight``, ``moe_top_p`` (as in
  :class:`xquant_fx.XQuantConfig`), or ``moe_plan`` (what :func:`xquant_fx.optimize` passes): the
  expert pruning of :mod:`xquant_fx.passes.prune_moe_router`;
* ``xquant_verbose``: print the passes' hits for every graph compiled;
* ``mode``: as torch.compile's ``mode`` (which torch.compile does not take together with options).
"""

from __future__ import annotations

import logging

import torch

from .moe import plan_from_options
from .passes import PassContext, PassReport, run_passes

logger = logging.getLogger(__name__)

#: Hits of every pass over every graph this process compiled with the backend.
REPORT = PassReport()


def xquant(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None, **_):
    """Backend entry point: ``torch.compile(model, backend="xquant", mode=..., options=...)``."""
    from . import ops  # noqa: F401  (registers the xquant:: ops the passes emit)

    patches = dict(options or {})
    mode = mode or patches.pop("mode", None)  # torch.compile refuses mode and options together
    verbose = bool(patches.pop("xquant_verbose", False))
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
    return compile_fx(gm, example_inputs, config_patches=patches)


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
