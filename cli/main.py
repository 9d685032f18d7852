"""`plan`: the command line. Parses arguments and dispatches; no logic of its own.

Command modules are imported to declare their arguments; each keeps torch and the
planner behind imports inside `run()`, so `plan check` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command → (module in meshplan.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "check plan files without a model (fast; no torch import)"),
    "fmt": ("fmt", "format plan files canonically, in place"),
    "compile": ("compile", "check a plan against a model and world size; emit the program"),
    "explain": ("explain", "dry-run a plan at any world size: mesh, layouts, memory and traffic per rank"),
    "pack": ("pack", "pack a sequence-length distribution; report efficiency and rank balance"),
    "run": ("run", "train with a plan under torchrun: compile, apply, train (reference loop)"),
    "export": ("export", "a checkpoint's adapters in PEFT's format, or the model with them merged (HF safetensors)"),
    "import": ("import_hf", "write a plan from a model's own tensor-parallel plan (`plan import hf MODEL`)"),
    "models": ("models", "list the model presets --model accepts, with family and size"),
    "explain-code": ("codes", "explain a diagnostic code (E506, W101, …) at length, with an example and the fix"),
}

# Exit codes, the same for every command (README § Exit codes).
EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it already says it (or has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, [], argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from meshplan.dsl import __version__

    parser = argparse.ArgumentParser(
        prog="plan",
        description="meshplan: check, compile and explain PyTorch parallelism plans.",
        epilog="exit codes: 0 ok, 1 plan rejected (or the model does not fit), 2 usage error, "
               "3 internal error (a bug: please report it)",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of internal errors")
    parser.add_argument("--version", action="version", version=f"meshplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show Python tracebacks of internal errors")
        importlib.import_module(f"meshplan.cli.{module}").add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from meshplan.runtime.parallel.noise import quiet_optional_backends

    quiet_optional_backends()  # torch-free; before any command imports torchao's users
    module = importlib.import_module(f"meshplan.cli.{COMMANDS[args.command][0]}")
    from .console import Terminal

    term = Terminal()
    try:
        code: int = module.run(args, term)
        return code
    except KeyboardInterrupt:
        term.note("interrupted")
        return 130
    except Exception as e:  # an internal error: say so plainly, traceback on request
        if getattr(args, "debug", False):
            raise
        term.note(f"plan {args.command}: internal error: {type(e).__name__}: {e}")
        term.note("run again with --debug for the traceback, and please report it")
        return EXIT_INTERNAL


# Commands whose work is done when `run` returns: no process group, thread, or file left
# open (outputs are written atomically and closed). Their process ends without the
# interpreter's teardown, which unloads torch, transformers and their extensions module by
# module: about 2.5 s on two cores, as much as `plan compile` spends compiling
# (`bench/explain.py` prints the imports timed both ways).
QUICK_EXIT = frozenset({"check", "compile", "explain", "import", "models", "explain-code"})


def entry() -> None:
    """The `plan` executable: `main()`, then the process's end (see `QUICK_EXIT`)."""
    code = main()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in QUICK_EXIT:
        quick_exit(code)
    sys.exit(code)


def quick_exit(code: int) -> None:
    """End the process now, once everything written is out (logging, stdout, stderr)."""
    import contextlib
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
