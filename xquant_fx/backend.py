"""The ``xquant`` torch.compile backend: the graph passes of :mod:`xquant_fx.passes`, then Inductor.

Registered under the name ``"xquant"`` when :mod:`xquant_fx` is imported, and through the
``torch_dynamo_backends`` entry point (so ``torch.compile(model, backend="xquant")`` also works in
a process that never imported the package). ``mode`` and ``options`` are passed through to
Inductor (``mode="reduce-overhead"`` gives CUDA graphs).
"""

from __future__ import annotations

import logging

import torch

from .passes import PassReport, run_passes

logger = logging.getLogger(__name__)

#: Hits of every pass over every graph this process compiled with the backend.
REPORT = PassReport()


def xquant(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None, **_):
    """Backend entry point: ``torch.compile(model, backend="xquant", mode=..., options=...)``."""
    from . import ops  # noqa: F401  (registers the xquant:: ops the passes emit)

    run_passes(gm, REPORT)
    logger.info("%s", REPORT)
    from torch._inductor.compile_fx import compile_fx

    patches = dict(options or {})
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
