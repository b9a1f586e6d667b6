"""Command line: ``python -m xquant_fx demo | memory``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import demo, memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xquant_fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="real SmolLM2: answers, speed and memory, full vs quantized cache"))
    memory.add_arguments(sub.add_parser("memory", help="how many tokens / what batch fits on a GPU, for any HF config"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runner = {"demo": demo.run, "memory": memory.run}[args.command]
    try:
        return runner(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
