"""Datasets for `plan run`, packed and dealt to the data-parallel ranks.

    sequences ──pack()──▶ bins of seq_len tokens ──PackedSampler──▶ this rank's bins per step
    (JSONL of token ids,                          (same schedule on     ──collate()──▶ batches
     JSONL of text + a local tokenizer,            every rank, no comm)   (the plan's format)
     or synthetic)

Sources (`load_sequences`):

- a `.jsonl` of token ids: one sequence per non-blank line, a JSON list of integers or an
  object with an `input_ids` list (the format `plan pack` reads);
- a `.jsonl` of text: one object per line with a `text` string (or a bare JSON string),
  tokenised with `transformers.AutoTokenizer` loaded from a LOCAL directory only
  (`local_files_only=True`: nothing is downloaded);
- `synthetic`: seeded random token sequences of varied lengths, random walks over a
  fixed table of successors so that the loss can fall (`synthetic_sequences`).

Guarantees:

- Every token id is checked against the model's vocabulary before training starts, data
  in which no token has a target (all sequences of one token) is refused, and every
  problem with a file is a `DataError` naming the file and line.
- `PackedData` packs once (the plan's `packing` algorithm, overlong policy and seed) and
  `PackedData.loader(dp_rank, dp_size, micro_batch)` yields, per step, the `micro_batch`
  collated bins of this data-parallel rank, forever (epoch after epoch). Every rank of a
  data-parallel group computes the same schedule on its own; the union of the ranks'
  bins at a step does not depend on how the global batch `dp_size * micro_batch` is split
  (so a single process with `micro_batch = dp_size` sees the global batch of `dp_size`
  ranks with `micro_batch = 1` — what the equivalence tests rely on).
- Labels are already shifted (see `meshplan.runtime.packing.collators`); each batch also
  carries `num_tokens`, its real (non-padding) token count, for throughput figures.
- Context parallelism (`build(..., context=split)`, `loader(..., cp_rank=r)`): every
  sequence is packed and collated padded to a multiple of 2·cp, and each batch is cut
  by `runtime.parallel.context.shard_batch` — the context-parallel peers of a data-parallel rank read
  the same bins and each keeps its part.
- `PackedLoader.state_dict()` / `load_state_dict()` resume mid-epoch exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..packing import PackedSampler, PackResult, collate, pack
from ..parallel.context import ContextSplit, shard_batch

__all__ = [
    "DataError",
    "PackedData",
    "PackedLoader",
    "load_sequences",
    "read_text_jsonl",
    "read_token_jsonl",
    "synthetic_sequences",
]

SYNTHETIC = "synthetic"
Tokens = NDArray[np.int64]
Batch = dict[str, Any]


class DataError(ValueError):
    """A dataset that cannot be read or does not fit the model; one-line message."""


def synthetic_sequences(n: int, vocab_size: int, *, min_len: int, max_len: int,
                        seed: int = 0, successors: int = 4) -> list[Tokens]:
    """`n` seeded random sequences, lengths uniform in [min_len, max_len], that a model
    can learn: a random walk over a fixed random table giving every token `successors`
    possible next tokens (so the loss can fall from ln(vocab) towards ln(successors)).
    A pure function of the arguments."""
    if n < 1 or vocab_size < 1 or successors < 1 or not 1 <= min_len <= max_len:
        raise DataError(f"synthetic data needs n >= 1, vocab >= 1 and 1 <= min_len <= max_len; "
                        f"got n={n}, vocab={vocab_size}, lengths {min_len}..{max_len}")
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab_size, size=(vocab_size, successors))
    lengths = rng.integers(min_len, max_len + 1, size=n)
    out = []
    for k in lengths:
        picks = rng.integers(0, successors, size=int(k))
        seq = np.empty(int(k), dtype=np.int64)
        seq[0] = rng.integers(0, vocab_size)
        for i in range(1, int(k)):
            seq[i] = table[seq[i - 1], picks[i]]
        out.append(seq)
    return out


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None


def read_token_jsonl(path: str | Path) -> list[Tokens]:
    """Sequences from a JSONL of token-id lists (or `{"input_ids": [...]}` objects)."""
    p = Path(path)
    out: list[Tokens] = []
    for number, value in _lines(p):
        ids = value.get("input_ids") if isinstance(value, dict) else value
        if not isinstance(ids, list) or not ids:
            raise DataError(f"{p}:{number}: expected a non-empty list of token ids "
                            "(or an object with an `input_ids` list)")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise DataError(f"{p}:{number}: token ids must be non-negative integers")
        out.append(np.asarray(ids, dtype=np.int64))
    if not out:
        raise DataError(f"{p}: no sequences")
    return out


def read_text_jsonl(path: str | Path, tokenizer: str | Path, *, field: str = "text",
                    add_eos: bool = True) -> list[Tokens]:
    """Sequences from a JSONL of text, tokenised by the tokenizer in a local directory."""
    from transformers import AutoTokenizer

    p, directory = Path(path), Path(tokenizer)
    if not directory.is_dir():
        raise DataError(f"--tokenizer {directory}: not a directory (tokenizers are loaded "
                        "from a local directory only)")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise DataError(f"--tokenizer {directory}: cannot load a tokenizer: "
                        f"{type(e).__name__}: {e}".splitlines()[0]) from None
    eos = getattr(tok, "eos_token_id", None)
    out: list[Tokens] = []
    for number, value in _lines(p):
        text = value.get(field) if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise DataError(f"{p}:{number}: expected an object with a `{field}` string")
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if add_eos and isinstance(eos, int) and (not ids or ids[-1] != eos):
            ids.append(eos)
        if ids:
            out.append(np.asarray(ids, dtype=np.int64))
    if not out:
        raise DataError(f"{p}: no text")
    return out


def _is_text(path: Path) -> bool:
    for _, value in _lines(path):
        return isinstance(value, str) or (isinstance(value, dict) and "input_ids" not in value)
    return False


def load_sequences(source: str | Path | None, *, vocab_size: int, seq_len: int,
                   tokenizer: str | Path | None = None, seed: int = 0,
                   synthetic_count: int = 256) -> list[Tokens]:
    """The sequences of `--data`: a JSONL path, or None / "synthetic" for synthetic data
    (lengths seq_len/8 .. seq_len). Token ids must be < vocab_size."""
    if source is None or str(source) == SYNTHETIC:
        return synthetic_sequences(synthetic_count, vocab_size, min_len=max(2, seq_len // 8),
                                   max_len=max(2, seq_len), seed=seed)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file (or give `synthetic`)")
    if _is_text(path):
        if tokenizer is None:
            raise DataError(f"--data {path} holds text: give --tokenizer DIR (a local tokenizer)")
        seqs = read_text_jsonl(path, tokenizer)
    else:
        seqs = read_token_jsonl(path)
    top = max(int(s.max()) for s in seqs)
    if top >= vocab_size:
        raise DataError(f"--data {path}: token id {top} is outside the model's vocabulary "
                        f"of {vocab_size}")
    if all(len(s) < 2 for s in seqs):
        # A causal LM learns each token from the ones before it: a lone token has no
        # target, and training would report a loss of 0 over nothing.
        raise DataError(f"--data {path}: every sequence has a single token, so no token has a "
                        "target to learn; sequences need two tokens or more")
    return seqs


@dataclass(frozen=True)
class PackedData:
    """Sequences packed into bins of `seq_len` tokens, collated in the plan's `format`."""

    sequences: Sequence[Tokens]
    result: PackResult
    format: str = "varlen"
    pad_id: int = 0
    context: ContextSplit | None = None

    @classmethod
    def build(cls, sequences: Sequence[Tokens], seq_len: int, *, algorithm: str = "ffd",
              format: str = "varlen", overlong: str = "error", max_per_bin: int | None = None,
              seed: int = 0, pad_id: int = 0, context: ContextSplit | None = None) -> PackedData:
        """Pack once. With `context` (the plan's context-parallel split) every sequence is
        packed and collated padded to a multiple of 2·cp, so that it can be cut head-tail."""
        lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
        multiple = context.pad_multiple if context is not None else 1
        if context is not None and seq_len % context.chunks:
            raise DataError(f"seq_len {seq_len} cannot be cut into {context.chunks} equal chunks for "
                            f"context parallelism over {context.size} ranks")
        result = pack(lengths, seq_len, algorithm, max_per_bin=max_per_bin, overlong=overlong,
                      seed=seed, pad_multiple=multiple)
        return cls(sequences, result, format, pad_id, context)

    @property
    def seq_len(self) -> int:
        return self.result.seq_len

    def collate(self, positions: NDArray[np.int64]) -> Batch:
        """The collated bin holding the packed items at `positions` (empty: a padding bin)."""
        r = self.result
        seqs = [self.sequences[int(r.indices[j])][int(r.starts[j]):int(r.starts[j] + r.lengths[j])]
                for j in positions]
        size = {"max_len": self.seq_len} if self.format == "padded" else {"seq_len": self.seq_len}
        cp_size = self.context.collate_cp_size if self.context is not None else 1
        batch = collate(seqs, self.format, pad_id=self.pad_id, cp_size=cp_size, **size)
        batch["num_tokens"] = int(sum(len(s) for s in seqs))
        return batch

    def loader(self, dp_rank: int = 0, dp_size: int = 1, *, micro_batch: int = 1,
               seed: int = 0, cp_rank: int | None = None) -> PackedLoader:
        """This data-parallel rank's batches; with `cp_rank` (and the data built with a
        context split) each batch is this context-parallel rank's part of the bin."""
        if cp_rank is not None and self.context is None:
            raise DataError("cp_rank given, but the data was not built with a context split")
        sampler = PackedSampler(self.result, dp_rank, dp_size, seed=seed, micro_batch=micro_batch)
        return PackedLoader(self, sampler, cp_rank)


class PackedLoader:
    """Per step, this rank's `micro_batch` collated bins; iterates forever."""

    def __init__(self, data: PackedData, sampler: PackedSampler, cp_rank: int | None = None) -> None:
        self.data = data
        self.sampler = sampler
        self.cp_rank = cp_rank

    def _batch(self, positions: NDArray[np.int64]) -> Batch:
        batch = self.data.collate(positions)
        if self.cp_rank is None or self.data.context is None:
            return batch
        return shard_batch(batch, self.data.context, self.cp_rank)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            for bins in self.sampler:
                yield [self._batch(b) for b in bins]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
