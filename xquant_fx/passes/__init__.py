"""Graph passes of the ``xquant`` backend, run in one ordered pipeline on the Dynamo FX graph.

Each pass is ``pass_fn(gm: torch.fx.GraphModule, ctx: PassContext) -> int`` (the number of
rewrites it made; ``ctx`` carries what the backend was asked for, e.g. the MoE plan), lives
in a file named after it, documents the pattern it matches and when it declines (declines are
logged at DEBUG level), and counts its hits in ``torch._dynamo.utils.counters["xquant"]``.
The runner lints and recompiles the graph after every pass that changed it and names the pass
that failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..moe import MoEPlan
from .fuse_kv_attention import fuse_kv_attention
from .inline_rotations import inline_rotations
from .prune_moe_router import prune_moe_router
from .router_topk import router_topk

logger = logging.getLogger(__name__)

#: The pipeline, in order.
PASSES = (fuse_kv_attention, inline_rotations, prune_moe_router, router_topk)


@dataclass
class PassContext:
    """What the passes were asked to do: ``moe`` is the expert-pruning plan (``None``: keep the
    model's routing)."""

    moe: MoEPlan | None = None


@dataclass
class PassReport:
    """Hits per pass over every graph the backend compiled (one entry per pass name)."""

    hits: dict[str, int] = field(default_factory=dict)
    graphs: int = 0

    def add(self, name: str, count: int) -> None:
        self.hits[name] = self.hits.get(name, 0) + count

    def __str__(self) -> str:
        rows = ", ".join(f"{name}: {count}" for name, count in self.hits.items())
        return f"xquant passes over {self.graphs} graph(s): {rows or 'none ran'}"


class PassFailed(RuntimeError):
    pass


def run_passes(
    gm: torch.fx.GraphModule, report: PassReport | None = None, passes=PASSES, ctx: PassContext | None = None
) -> torch.fx.GraphModule:
    """Run ``passes`` in order on ``gm`` (in place); returns ``gm``."""
    report = report if report is not None else PassReport()
    ctx = ctx if ctx is not None else PassContext()
    report.graphs += 1
    for pass_fn in passes:
        name = pass_fn.__name__
        try:
            hits = pass_fn(gm, ctx)
            if hits:
                gm.graph.lint()
                gm.recompile()
        except Exception as err:
            raise PassFailed(f"xquant pass `{name}` failed: {err}") from err
        report.add(name, hits)
        torch._dynamo.utils.counters["xquant"][name] += hits
        logger.debug("pass %s: %d hit(s)", name, hits)
    return gm
