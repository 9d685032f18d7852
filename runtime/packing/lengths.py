"""Read sequence lengths from a file: what `plan pack` packs.

`load_lengths(path)` returns a 1-D int64 array of lengths, every one >= 1, from
- `.npy`: a 1-D integer array of lengths;
- `.json`: a histogram `{"counts": [c1, c2, ...]}` where counts[i] sequences have length
  i + 1 (other keys are ignored), expanded in increasing length order;
- `.jsonl`: one sequence per non-blank line, a JSON list of token ids or an object with an
  `input_ids` list; its length is the number of ids.

Guarantee: any other outcome — a missing or unreadable file, an unknown extension, an
empty file, malformed content, a zero or negative length — raises `PackingError` with a
one-line message that names the file (and, for JSONL, the line number).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import PackingError

SUFFIXES: tuple[str, ...] = (".npy", ".json", ".jsonl")


# The most sequences a histogram may expand to (their int64 lengths alone take 8 GiB).
MAX_SEQUENCES = 2**30


def load_lengths(path: str | Path) -> NDArray[np.int64]:
    """Sequence lengths stored in `path` (see the module docstring for the formats)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise PackingError(f"{p}: unsupported length file (expected {', '.join(SUFFIXES)})")
    if not p.is_file():
        raise PackingError(f"{p}: no such file")
    try:
        if p.stat().st_size == 0:
            raise PackingError(f"{p}: file is empty")
        if suffix == ".npy":
            return _from_npy(p)
        if suffix == ".json":
            return _from_histogram(p)
        return _from_jsonl(p)
    except OSError as e:
        raise PackingError(f"{p}: cannot read: {e.strerror or e}") from None


def _checked(p: Path, lens: NDArray[np.int64]) -> NDArray[np.int64]:
    if lens.shape[0] == 0:
        raise PackingError(f"{p}: no sequences")
    bad = np.flatnonzero(lens < 1)
    if bad.shape[0]:
        raise PackingError(
            f"{p}: lengths must be >= 1; {bad.shape[0]} are not "
            f"(first at index {int(bad[0])}: {int(lens[bad[0]])})"
        )
    return lens


def _from_npy(p: Path) -> NDArray[np.int64]:
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise PackingError(f"{p}: not a valid .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        shape = getattr(arr, "shape", None)
        raise PackingError(f"{p}: expected a 1-D array of lengths, got shape {shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise PackingError(f"{p}: lengths must be integers, got {arr.dtype}")
    if arr.dtype == np.uint64 and arr.shape[0] and int(arr.max()) >= 2**63:
        raise PackingError(f"{p}: a length does not fit in int64")
    return _checked(p, arr.astype(np.int64))


def _from_histogram(p: Path) -> NDArray[np.int64]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackingError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "counts" not in data:
        raise PackingError(f'{p}: expected a histogram object {{"counts": [...]}}')
    counts = data["counts"]
    if not isinstance(counts, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts
    ):
        raise PackingError(f'{p}: "counts" must be a list of integers')
    negative = [i for i, c in enumerate(counts) if c < 0]
    if negative:
        raise PackingError(
            f'{p}: "counts" must be >= 0; counts[{negative[0]}] is {counts[negative[0]]}'
        )
    total = sum(counts)
    if total == 0:
        raise PackingError(f"{p}: the histogram holds no sequences")
    if total > MAX_SEQUENCES:  # checked before np.repeat allocates 8 bytes per sequence
        raise PackingError(f"{p}: the histogram holds {total:,} sequences; at most "
                           f"{MAX_SEQUENCES:,} can be expanded (8 GiB of lengths)")
    c = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.arange(1, c.shape[0] + 1, dtype=np.int64), c)


def _from_jsonl(p: Path) -> NDArray[np.int64]:
    lens: list[int] = []
    with p.open("rb") as f:  # bytes, so a decoding error can name its line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PackingError(f"{p}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise PackingError(f"{p}:{number}: not valid JSON ({e.msg})") from None
            ids = row.get("input_ids") if isinstance(row, dict) else row
            if not isinstance(ids, list):
                raise PackingError(
                    f"{p}:{number}: expected a list of token ids or an object with an "
                    '"input_ids" list'
                )
            if not ids:
                raise PackingError(f"{p}:{number}: empty sequence (length 0)")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise PackingError(f"{p}:{number}: token ids must be integers")
            lens.append(len(ids))
    if not lens:
        raise PackingError(f"{p}: no sequences (only blank lines)")
    return np.asarray(lens, dtype=np.int64)
