"""Argument types shared by commands: integers in range, sizes with units.

Each raises `argparse.ArgumentTypeError`, which argparse turns into a usage error
(exit 2) naming the option, before any work is done.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

# Upper bounds on what a command is asked to model: far above any real job, low enough
# that nothing sized by them (rank lists, token arrays) can exhaust memory.
MAX_WORLD_SIZE = 2**20
MAX_SEQ_LEN = 2**24
MAX_MICRO_BATCH = 2**16

# Memory sizes. GB and GiB both mean 2**30 bytes, as GPU specifications use them (an
# "80GB" H100 has 80 GiB); so do KB/MB/TB.
_UNITS = {"b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20,
          "gb": 2**30, "gib": 2**30, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_in_range(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [low, high]; `what` says why the bound is there."""
    def convert(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            reason = f" ({what})" if what else ""
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {low:,} to {high:,}{reason}")
        return value

    convert.__name__ = "integer"  # argparse names the type in its messages
    return convert


world_size_arg = int_in_range(1, MAX_WORLD_SIZE, "ranks")
seq_len_arg = int_in_range(1, MAX_SEQ_LEN, "tokens per sequence")
micro_batch_arg = int_in_range(1, MAX_MICRO_BATCH, "sequences per rank and step")


def memory_size(text: str) -> int:
    """argparse type: a memory size with its unit (`80GiB`, `80GB`, `512MiB`) → bytes.

    A bare number is refused: `80` could mean bytes or gigabytes, and the wrong guess
    turns the budget check silently off or always on.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 80GiB, 80GB or 512MiB)")
    number, unit = match.groups()
    if not unit:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no unit: write e.g. {number}GiB or {number}MiB (GB and GiB both mean 2^30 bytes)")
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise argparse.ArgumentTypeError(f"unknown unit {unit!r} in {text!r}: use B, KiB, MiB, GiB or TiB "
                                         "(KB, MB, GB, TB mean the same)")
    scaled = float(number) * factor
    if not 1 <= scaled <= 2**60:  # also catches inf from a thousand-digit number
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected 1B to 1024PiB")
    return int(scaled)
