"""Byte sizes as `plan explain` prints and reads them (`human_bytes`, `parse_bytes`), and
what a 4-bit NF4 weight costs (`nf4_bytes`, `nf4_gathered_bytes`).

An NF4 weight of `numel` values, as torchao's `NF4Tensor` holds it (QLoRA's double
quantisation): `quantized_data`, two 4-bit codes per uint8 (numel / 2 bytes);
`quantized_scalers`, one int8 absmax scaler per `block_size` values; `quantization_factor`,
one scale per `scaler_block_size` scalers, in the dtype the weight was quantised from;
and per tensor a 0-d `scaler_mean` and the 16-value code table `nf4`, in that dtype too.
FSDP2 shards the first three along dim 0 and all-gathers only them
(`NF4Tensor.fsdp_pre_all_gather`); every shard keeps its own `scaler_mean` and `nf4`.
"""

from __future__ import annotations

import re

__all__ = ["human_bytes", "human_count", "nf4_bytes", "nf4_gathered_bytes", "parse_bytes"]


def human_bytes(n: float) -> str:
    """1536 → `1.5 KiB`; exact below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    return f"{n:.0f} PiB"  # pragma: no cover


def human_count(n: int) -> str:
    """207_093_760 → `207.1 M`; exact below a thousand (parameter counts: K, M, B, T)."""
    if n < 1000:
        return str(n)
    value = float(n)
    for unit in ("K", "M", "B", "T"):
        value /= 1000
        if value < 999.5 or unit == "T":  # what rounds to 1000 is the next unit
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{value:.0f} T"  # pragma: no cover


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


NF4_CODES = 16  # the code table every NF4 tensor carries


def nf4_gathered_bytes(numel: int, block_size: int = 64, scaler_block_size: int = 256, *,
                       itemsize: int = 4) -> int:
    """The bytes of an NF4 weight that FSDP2 all-gathers: codes, scalers and their scales
    (`itemsize`: the dtype the weight was quantised from)."""
    blocks = numel // block_size
    return numel // 2 + blocks + (blocks // scaler_block_size) * itemsize


def nf4_bytes(numel: int, block_size: int = 64, scaler_block_size: int = 256, *, itemsize: int = 4) -> int:
    """The bytes an NF4 weight (or one FSDP2 shard of it) of `numel` values allocates:
    what is gathered plus its `scaler_mean` and code table (see the module docstring)."""
    return nf4_gathered_bytes(numel, block_size, scaler_block_size, itemsize=itemsize) + (1 + NF4_CODES) * itemsize
