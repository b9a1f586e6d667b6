"""``memory``: how many tokens / what batch fit on a GPU with a quantized KV cache, for any HF config
(the planning is :mod:`xquant_fx.memory`)."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import XQuantConfig
from ..memory import DEFAULT_MAX_CACHE_LEN_CAP, DEFAULT_RESERVE_FRACTION, bundled_configs, format_plan, parse_memory, plan


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``memory`` command's options to ``parser`` (for wiring into a subcommand CLI)."""
    parser.add_argument("--config", required=True,
                        help=f"bundled name ({', '.join(bundled_configs())}), a config.json path or a model directory")
    parser.add_argument("--preset", default="xquant-1.38", type=spec_arg,
                        help=f"cache preset ({', '.join(XQuantConfig.PRESETS)}), optionally modified: "
                             "PRESET:field=value[,field=value...], e.g. kivi-2:metadata_dtype=float8_e4m3fn")
    parser.add_argument("--gpu-memory", required=True, type=_memory_arg,
                        help="GPU memory, e.g. 80GB (1e9 bytes), 141GiB (2^30 bytes), 80e9")
    parser.add_argument("--max-cache-len", type=int, default=None,
                        help=f"tokens per sequence for the max-batch question (default: the model's context, "
                             f"capped at {DEFAULT_MAX_CACHE_LEN_CAP})")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences for the max-tokens question")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weight and cache dtype")
    parser.add_argument("--reserve", type=float, default=DEFAULT_RESERVE_FRACTION,
                        help="fraction of GPU memory kept for activations and CUDA context (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return parser


def spec_arg(text: str) -> str:
    """argparse type of a config spec (:meth:`XQuantConfig.from_spec`): checked, returned stripped."""
    try:
        XQuantConfig.from_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.strip()


def _memory_arg(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Run the ``memory`` command on parsed arguments; print the report; return the exit code.
    A bad value raises ``ValueError`` (the caller prints it as a usage error)."""
    result = plan(
        args.config,
        args.preset,
        args.gpu_memory,
        max_cache_len=args.max_cache_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        reserve_fraction=args.reserve,
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``memory`` command alone, on ``argv``: plan tokens and batch for a GPU; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m xquant_fx memory",
        description="How many tokens / what batch fit on a GPU with a quantized KV cache.",
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run(args)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
