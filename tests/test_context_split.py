"""How batches are cut for context parallelism (`runtime.parallel.context`), in one process.

The multi-rank numerics are in `test_context_parallel.py`; here: which rank holds which
token, what a local batch carries, that the mask rebuilt from it is the full row's, and
that every malformed input is refused with a message naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from meshplan.runtime.attention.context import CpLayout
from meshplan.runtime.attention.exact import segment_mask
from meshplan.runtime.packing import collate
from meshplan.runtime.parallel.context import (
    CP_KEY_INDEX,
    CP_QUERY_INDEX,
    CP_SEGMENT_IDS,
    ContextSplit,
    owners,
    shard_batch,
)
from meshplan.runtime.train.data import DataError, PackedData, synthetic_sequences


def _seqs(*lengths: int) -> list[torch.Tensor]:
    return [torch.arange(1, n + 1) + 100 * i for i, n in enumerate(lengths)]


def test_headtail_gives_rank_r_chunks_r_and_mirror_of_every_segment() -> None:
    # Two segments of 8 and 16 tokens, cp 2: chunks of 2 and 4 tokens.
    seg = torch.tensor([0] * 8 + [1] * 16)
    got = owners(seg, ContextSplit(2))
    assert got.tolist() == [0, 0, 1, 1, 1, 1, 0, 0] + [0] * 4 + [1] * 8 + [0] * 4


def test_plain_split_is_contiguous() -> None:
    got = owners(torch.tensor([0] * 6 + [1] * 6), ContextSplit(3, "none"))
    assert got.tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("cp", [2, 4])
def test_every_rank_holds_an_equal_share_of_every_sequence(cp: int) -> None:
    batch = collate(_seqs(5, 13, 2, 9), "varlen", seq_len=64, cp_size=cp)
    seg = shard_batch(batch, ContextSplit(cp), 0)[CP_SEGMENT_IDS][0]
    own = owners(seg, ContextSplit(cp))
    for s in seg.unique():
        counts = torch.bincount(own[seg == s], minlength=cp)
        assert counts.min() == counts.max()


def test_a_segment_that_cannot_be_cut_head_tail_is_named() -> None:
    batch = collate(_seqs(5, 7), "varlen", seq_len=16)  # not padded for cp
    with pytest.raises(ValueError, match=r"segment 0 \(tokens 0\.\.4\) has 5 tokens, not a multiple of "
                                         r"2·cp = 4: collate with cp_size=2"):
        shard_batch(batch, ContextSplit(2), 0)


def test_cp_1_keeps_the_row_whatever_its_segments() -> None:
    batch = collate(_seqs(5, 7), "varlen", seq_len=16)
    local = shard_batch(batch, ContextSplit(1), 0)
    assert torch.equal(local["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("fmt", ["varlen", "thd", "segment_ids", "padded"])
@pytest.mark.parametrize("split", [ContextSplit(2), ContextSplit(4), ContextSplit(2, "none")],
                         ids=["headtail2", "headtail4", "none2"])
def test_the_ranks_parts_make_up_the_row(fmt: str, split: ContextSplit) -> None:
    size = {"max_len": 16} if fmt == "padded" else {"seq_len": 48}
    batch = collate(_seqs(5, 13, 3), fmt, cp_size=split.collate_cp_size, **size)
    batch["num_tokens"] = 21
    parts = [shard_batch(batch, split, r) for r in range(split.size)]
    keys = parts[0][CP_KEY_INDEX]
    assert torch.equal(torch.cat([p[CP_QUERY_INDEX] for p in parts]), keys)
    assert sorted(keys.tolist()) == list(range(batch["input_ids"].shape[1]))
    for name in ("input_ids", "position_ids", "labels"):
        rebuilt = torch.empty_like(batch[name])
        rebuilt[:, keys] = torch.cat([p[name] for p in parts], dim=1)
        assert torch.equal(rebuilt, batch[name]), name  # labels stay shifted on the full row
    assert [p["num_tokens"] for p in parts] == [21] + [0] * (split.size - 1)
    for p in parts:
        assert not {"cu_seqlens", "cu_seqlens_padded", "segment_ids", "attention_mask"} & p.keys()


@pytest.mark.parametrize("window", [None, 3])
def test_the_rebuilt_mask_is_the_full_rows(window: int | None) -> None:
    split = ContextSplit(4)
    batch = collate(_seqs(6, 13, 3), "segment_ids", seq_len=48, cp_size=4)
    full = segment_mask(batch["segment_ids"], causal=True, window=window)[0, 0]
    for rank in range(4):
        local = shard_batch(batch, split, rank)
        layout = CpLayout.of(local, 1, 12, 4, "test")
        mask = layout.mask(layout.key_index, causal=True, window=window)[0, 0]
        q, k = local[CP_QUERY_INDEX], local[CP_KEY_INDEX]
        assert torch.equal(mask, full[q][:, k])


def test_refusals() -> None:
    batch = collate(_seqs(4, 8), "varlen", seq_len=16, cp_size=2)
    with pytest.raises(ValueError, match=r"cp rank 2 is outside 0\.\.1"):
        shard_batch(batch, ContextSplit(2), 2)
    with pytest.raises(ValueError, match="already split"):
        shard_batch(shard_batch(batch, ContextSplit(2), 0), ContextSplit(2), 0)
    with pytest.raises(ValueError, match="cannot be cut into cp = 3 equal parts"):
        shard_batch(batch, ContextSplit(3, "none"), 0)
    with pytest.raises(ValueError, match="integer >= 1"):
        ContextSplit(0)
    with pytest.raises(ValueError, match="headtail or none"):
        ContextSplit(2, "zigzag")  # type: ignore[arg-type]
    rows = {"input_ids": torch.zeros(2, 8, dtype=torch.int64),
            "segment_ids": torch.tensor([[1] * 8, [1] * 4 + [2] * 4])}
    with pytest.raises(ValueError, match="row 1 of the batch is segmented differently"):
        shard_batch(rows, ContextSplit(2), 0)


def test_the_layout_names_the_fix_when_the_batch_was_not_split() -> None:
    with pytest.raises(RuntimeError, match=r"`model.layers.0.self_attn` runs context-parallel attention "
                                           r"but the model was called without cp_query_index"):
        CpLayout.of({}, 1, 8, 2, "`model.layers.0.self_attn`")
    local = shard_batch(collate(_seqs(4, 8), "varlen", seq_len=16, cp_size=2), ContextSplit(2), 0)
    with pytest.raises(RuntimeError, match="was the batch split for another cp size"):
        CpLayout.of(local, 1, 4, 4, "attention")


def test_the_loader_pads_for_cp_and_cuts_each_bin() -> None:
    sequences = synthetic_sequences(40, 64, min_len=3, max_len=15, seed=2)
    split = ContextSplit(2)
    data = PackedData.build(sequences, 32, context=split)
    whole = next(iter(data.loader(0, 1, micro_batch=1)))[0]
    parts = [next(iter(data.loader(0, 1, micro_batch=1, cp_rank=r)))[0] for r in range(2)]
    assert whole["cu_seqlens"].diff().remainder(4).eq(0).all()  # every sequence padded to 2·cp
    assert [p["input_ids"].shape[1] for p in parts] == [16, 16]
    assert torch.equal(parts[1]["input_ids"], shard_batch(whole, split, 1)["input_ids"])
    with pytest.raises(DataError, match="cannot be cut into 8 equal chunks"):
        PackedData.build(sequences, 36, context=ContextSplit(4))
    with pytest.raises(DataError, match="not built with a context split"):
        PackedData.build(sequences, 32).loader(0, 1, cp_rank=0)
