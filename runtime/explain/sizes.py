"""Byte sizes as `plan explain` prints and reads them: `human_bytes`, `parse_bytes`."""

from __future__ import annotations

import re

__all__ = ["human_bytes", "parse_bytes"]


def human_bytes(n: float) -> str:
    """1536 → `1.5 KiB`; exact below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    return f"{n:.0f} PiB"  # pragma: no cover


def parse_bytes(text: str) -> int:
    """`80GB`, `80 GiB`, `81920MB`, `1e9` → bytes (GB and GiB both mean 2**30)."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in units:
        raise ValueError(f"not a size: {text!r} (e.g. 80GB)")
    value = float(match.group(1)) * units[match.group(2)]
    if value <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return int(value)
