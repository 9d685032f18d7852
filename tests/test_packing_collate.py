"""Collators: exact tensors on small bins (labels shifted inside each sequence, -100 at
boundaries and padding, cu_seqlens, context-parallel padding), packed loss equal to the
unpacked loss, and input errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.runtime.packing import (
    IGNORE_INDEX,
    PackingError,
    collate,
    collate_padded,
    collate_segment_ids,
    collate_thd,
    collate_varlen,
    pack,
)

X = IGNORE_INDEX
BIN = [[11, 12, 13], [21, 22]]


def t(rows: list[Any], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def assert_batch(batch: dict[str, object], expected: dict[str, object]) -> None:
    assert set(batch) == set(expected)
    for key, want in expected.items():
        got = batch[key]
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), key
            assert got.dtype == want.dtype, key
            assert torch.equal(got, want), f"{key}: {got} != {want}"
        else:
            assert got == want, key


def test_varlen_unpadded() -> None:
    assert_batch(
        collate_varlen(BIN),
        {
            "input_ids": t([[11, 12, 13, 21, 22]]),
            "position_ids": t([[0, 1, 2, 0, 1]]),
            "labels": t([[12, 13, X, 22, X]]),
            "cu_seqlens": t([0, 3, 5], torch.int32),
            "max_seqlen": 3,
        },
    )


def test_varlen_padded_to_seq_len_adds_a_tail_segment() -> None:
    assert_batch(
        collate_varlen(BIN, seq_len=8, pad_id=7),
        {
            "input_ids": t([[11, 12, 13, 21, 22, 7, 7, 7]]),
            "position_ids": t([[0, 1, 2, 0, 1, 0, 1, 2]]),
            "labels": t([[12, 13, X, 22, X, X, X, X]]),
            "cu_seqlens": t([0, 3, 5, 8], torch.int32),
            "max_seqlen": 3,
        },
    )


def test_context_parallel_pads_each_sequence_to_2_cp() -> None:
    # cp_size=2: each sequence padded to a multiple of 4; pads continue the positions.
    common = {
        "input_ids": t([[11, 12, 13, 0, 21, 22, 0, 0, 0, 0, 0, 0]]),
        "position_ids": t([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]]),
        "labels": t([[12, 13, X, X, 22, X, X, X, X, X, X, X]]),
        "max_seqlen": 4,
    }
    assert_batch(
        collate_varlen(BIN, seq_len=12, cp_size=2),
        common | {"cu_seqlens": t([0, 4, 8, 12], torch.int32)},
    )
    assert_batch(
        collate_thd(BIN, seq_len=12, cp_size=2),
        common
        | {
            "cu_seqlens": t([0, 3, 5, 9], torch.int32),
            "cu_seqlens_padded": t([0, 4, 8, 12], torch.int32),
        },
    )
    seg = collate_segment_ids(BIN, seq_len=12, cp_size=2)
    assert torch.equal(seg["segment_ids"], t([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0]]))


def test_thd_without_context_parallel_is_varlen() -> None:
    a, b = collate_thd(BIN, seq_len=8), collate_varlen(BIN, seq_len=8)
    assert set(a) == set(b)
    assert all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_segment_ids() -> None:
    assert_batch(
        collate_segment_ids(BIN, seq_len=7, pad_id=9),
        {
            "input_ids": t([[11, 12, 13, 21, 22, 9, 9]]),
            "position_ids": t([[0, 1, 2, 0, 1, 0, 1]]),
            "labels": t([[12, 13, X, 22, X, X, X]]),
            "segment_ids": t([[1, 1, 1, 2, 2, 0, 0]]),
        },
    )


def test_padded_rows() -> None:
    assert_batch(
        collate_padded(BIN, pad_id=5),
        {
            "input_ids": t([[11, 12, 13], [21, 22, 5]]),
            "labels": t([[12, 13, X], [22, X, X]]),
            "position_ids": t([[0, 1, 2], [0, 1, 2]]),
            "attention_mask": t([[1, 1, 1], [1, 1, 0]]),
        },
    )
    wide = collate_padded(BIN, cp_size=2)
    assert wide["input_ids"].shape == (2, 4)
    assert collate_padded(BIN, max_len=6)["labels"].tolist() == [
        [12, 13, X, X, X, X],
        [22, X, X, X, X, X],
    ]


def test_tensors_numpy_and_lists_collate_alike() -> None:
    seqs = [torch.tensor([11, 12, 13], dtype=torch.int32), np.array([21, 22])]
    a = collate(seqs, "varlen", seq_len=8)
    b = collate(BIN, "varlen", seq_len=8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].dtype == torch.int64


def test_empty_padding_bin() -> None:
    v = collate_varlen([], seq_len=4, pad_id=3)
    assert v["input_ids"].tolist() == [[3, 3, 3, 3]]
    assert v["labels"].tolist() == [[X] * 4]
    assert v["cu_seqlens"].tolist() == [0, 4]
    assert collate_varlen([])["cu_seqlens"].tolist() == [0]
    assert collate_segment_ids([], seq_len=3)["segment_ids"].tolist() == [[0, 0, 0]]
    assert collate_padded([])["input_ids"].shape == (0, 0)


def test_packed_loss_equals_unpacked_loss() -> None:
    # A position-wise model (embedding -> linear) makes the check exact: with the labels
    # already shifted, the packed loss must equal the per-sequence losses computed the
    # usual way (logits[:-1] against ids[1:]), token for token.
    torch.manual_seed(0)
    vocab = 50
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    seqs = [torch.randint(1, vocab, (n,)) for n in (5, 1, 7, 3)]
    total = sum(
        F.cross_entropy(model(s)[:-1], s[1:], reduction="sum") for s in seqs if s.numel() > 1
    )
    count = sum(s.numel() - 1 for s in seqs)
    for fmt, kw in [
        ("varlen", {"seq_len": 24}),
        ("thd", {"seq_len": 24, "cp_size": 2}),
        ("segment_ids", {"seq_len": 24}),
        ("padded", {}),
    ]:
        batch = collate(seqs, fmt, **kw)
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.flatten(0, -2), labels.flatten(), ignore_index=X, reduction="sum"
        )
        assert int((labels != X).sum()) == count, fmt
        torch.testing.assert_close(loss, total, msg=fmt)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: collate_varlen(BIN, seq_len=4),
            "bin holds 5 tokens (with per-sequence padding), more than seq_len=4",
        ),
        (lambda: collate_varlen([[1, 2], []]), "sequence 1 is empty"),
        (
            lambda: collate_varlen([torch.tensor([1.0, 2.0])]),
            "sequence 0: token ids must be integers, got torch.float32",
        ),
        (
            lambda: collate_varlen([[[1, 2]]]),
            "sequence 0: expected 1-D token ids, got shape (1, 2)",
        ),
        (
            lambda: collate_thd(BIN, seq_len=10, cp_size=2),
            "seq_len=10 must be a multiple of 2*cp_size=4 under context parallelism",
        ),
        (lambda: collate_varlen(BIN, cp_size=0), "cp_size must be an integer >= 1, got 0"),
        (lambda: collate_padded(BIN, max_len=2), "a sequence has 3 tokens, more than max_len=2"),
        (
            lambda: collate(BIN, "bshd"),
            "unknown collate format 'bshd'; choose one of varlen, thd, segment_ids, padded",
        ),
    ],
)
def test_collate_errors(call: object, message: str) -> None:
    with pytest.raises(PackingError) as info:
        call()  # type: ignore[operator]
    assert str(info.value) == message


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
    st.sampled_from([1, 2, 4]),
    st.sampled_from(["varlen", "thd", "segment_ids"]),
)
def test_bins_packed_for_context_parallel_always_fit_their_collator(
    lengths: list[int], cp_size: int, fmt: str
) -> None:
    # pack(pad_multiple=2*cp) reserves the room the per-sequence CP padding needs.
    seq_len = 48
    multiple = 2 * cp_size if cp_size > 1 else 1
    r = pack(lengths, seq_len, pad_multiple=multiple, overlong="split")
    for b in range(r.n_bins):
        ids, starts, lens = r.bin(b)
        seqs = [
            list(range(100 * i + s, 100 * i + s + n))
            for i, s, n in zip(ids, starts, lens, strict=True)
        ]
        batch = collate(seqs, fmt, seq_len=seq_len, cp_size=cp_size)
        assert batch["input_ids"].shape == (1, seq_len)
        assert int((batch["labels"] != X).sum()) == int((lens - 1).sum())
