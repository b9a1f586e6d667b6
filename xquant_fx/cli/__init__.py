"""Command line: ``python -m xquant_fx demo | eval | memory`` (also installed as ``xquant``).

One module per command (:mod:`.demo`, :mod:`.eval`, :mod:`.memory`), each with ``add_arguments``
(its options) and ``run`` (the command on parsed arguments); this module wires them together."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from . import demo, eval, memory

#: The program name when run as ``python -m xquant_fx`` (``__main__`` passes it).
MODULE_PROG = "python -m xquant_fx"


def _prog_name() -> str:
    """How this process was invoked: ``xquant`` from the console script, else the module form."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return MODULE_PROG if name in ("", "-", "-c", "-m", "__main__.py", "__init__.py") else name


class _TritonAbsentNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Triton not available")


def quiet_missing_triton() -> None:
    """Without triton installed (a CPU torch: pyproject leaves it to the ``test``/``triton``
    extras), ``torch.library.triton_op`` logs "Triton not available" once for each op that
    ``xquant_fx.ops`` registers, in the middle of a command's output. Off CUDA the ops run their
    torch reference, so nothing is missing: the commands drop that one message."""
    if importlib.util.find_spec("triton") is None:
        logger = logging.getLogger("torch._library.triton")
        if not any(isinstance(f, _TritonAbsentNotice) for f in logger.filters):
            logger.addFilter(_TritonAbsentNotice())


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or _prog_name(),
        description="xquant_fx: a 1-2 bit KV cache for Hugging Face transformers causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="real SmolLM2: answers, quality and memory, full vs quantized cache"))
    memory.add_arguments(sub.add_parser("memory", help="how many tokens / what batch fits on a GPU, for any HF config"))
    eval.add_arguments(sub.add_parser("eval", help="perplexity, agreement and retrieval of presets (and searched configs) on a real model"))
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one command; returns the exit code. Usage errors exit through argparse (code 2); a bad
    value found after parsing (a missing file, a config the model cannot hold) prints one
    ``PROG COMMAND: error: ...`` line and returns 2, as argparse would."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_missing_triton()
    runner = {"demo": demo.run, "memory": memory.run, "eval": eval.run}[args.command]
    try:
        return runner(args)
    except (ValueError, OSError) as err:
        # OSError: a file named on the command line that cannot be read or written; the message
        # names it. Anything else is a bug and keeps its traceback.
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
