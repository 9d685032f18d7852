"""Context-parallel attention: exact attention of this rank's queries over the whole sequence.

The ContextParallel step (`runtime.parallel.apply`) installs a `ContextParallelAttention`
on every attention module the plan names (attribute `CP_ATTRIBUTE`); meshplan's attention
backends find it with `context_parallel_of(module)` and hand it the call. How the sequence
is cut, and which keyword arguments each call receives, is `runtime.parallel.context`'s
business; the module docstring there describes the split and both K/V rotations.

- `rotate = allgather`: one all-gather of the stacked local K and V over the cp group
  (`all_gather_single_autograd`: its backward reduce-scatters their gradients), then one
  masked attention of the local queries over all T keys (the exact kernel).
- `rotate = ring`: cp − 1 shifts of the stacked K/V block to the next rank, each block
  attended with its log-sum-exp and merged by weights exp(lse_b − lse).

Attention sinks (`sinks`, one logit per query head) are exact on both: the all-gather
path hands them to the exact kernel; the ring scales the merged output by
sigmoid(lse − sink), the share of each row's softmax that the keys keep once the sink
is one more logit in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..parallel.context import CP_KEY_VALID, CP_KEYS, ContextSplit, LoadBalance, Rotate
from .exact import attend, repeat_kv_heads

__all__ = ["CP_ATTRIBUTE", "ContextParallelAttention", "CpLayout", "context_parallel_of"]

# The attribute the ContextParallel step sets on each attention module it names.
CP_ATTRIBUTE = "meshplan_context_parallel"


@dataclass(frozen=True)
class CpLayout:
    """The cp_* keyword arguments one attention call received, checked."""

    query_index: torch.Tensor
    key_index: torch.Tensor
    segment_ids: torch.Tensor
    key_valid: torch.Tensor | None

    @classmethod
    def of(cls, kwargs: Mapping[str, Any], batch: int, q_len: int, size: int, where: str) -> CpLayout:
        missing = [k for k in CP_KEYS[:3] if not isinstance(kwargs.get(k), torch.Tensor)]
        if missing:
            raise RuntimeError(
                f"{where} runs context-parallel attention but the model was called without "
                f"{', '.join(missing)}: pass every batch through `applied.shard_batch(batch)` "
                "(or a loader built with the plan's context split) and `forward_kwargs`")
        q, k, seg = (kwargs[n] for n in CP_KEYS[:3])
        valid = kwargs.get(CP_KEY_VALID)
        if q.numel() != q_len or k.numel() != q_len * size or seg.shape[-1] != k.numel():
            raise RuntimeError(
                f"{where}: the context-parallel layout is for {q.numel()} local of {k.numel()} tokens, "
                f"but attention sees {q_len} local tokens on {size} ranks; was the batch split for "
                "another cp size?")
        if seg.shape[0] not in (1, batch):
            raise RuntimeError(f"{where}: cp_segment_ids has {seg.shape[0]} rows, the batch {batch}")
        return cls(q, k, seg, valid)

    def mask(self, keys: torch.Tensor, *, causal: bool, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, Tq, len(keys)]: may local query i attend the key at row
        position `keys[j]` (see the module docstring)."""
        q = self.query_index
        seg = self.segment_ids
        allowed = seg[:, q][:, :, None] == seg[:, keys][:, None, :]
        distance = (q[:, None] - keys[None, :])[None]
        if causal:
            allowed = allowed & (distance >= 0)
        if window is not None:
            allowed = allowed & ((distance if causal else distance.abs()) < window)
        if self.key_valid is not None:
            allowed = allowed & (self.key_valid[:, keys][:, None, :] | (distance == 0))
        return allowed[:, None]


@dataclass
class ContextParallelAttention:
    """What the ContextParallel step installs on an attention module: its cp group and
    how K/V travel. `attend` is called by meshplan's attention backends."""

    group: dist.ProcessGroup
    size: int
    rank: int
    rotate: Rotate = "allgather"
    load_balance: LoadBalance = "headtail"
    fqn: str = ""  # the attention module, for messages

    @property
    def split(self) -> ContextSplit:
        return ContextSplit(self.size, self.load_balance)

    def layout(self, kwargs: Mapping[str, Any], batch: int, q_len: int) -> CpLayout:
        """The call's cp layout, checked; errors name this attention module."""
        return CpLayout.of(kwargs, batch, q_len, self.size, f"`{self.fqn or 'attention'}`")

    def gather_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' K and V, [B, Hkv, T, D] in `cp_key_index` order (differentiable)."""
        from torch.distributed import _functional_collectives as fc

        kv = torch.stack([key, value]).contiguous()
        gathered = fc.wait_tensor(fc.all_gather_single_autograd(kv, gather_dim=3, group=self.group))
        return gathered[0], gathered[1]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               kwargs: Mapping[str, Any], *, causal: bool, window: int | None, scaling: float | None,
               dropout: float, softcap: float | None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Tq, H, D]: the local queries' exact attention over the whole sequence
        (`sinks`: [H] sink logits, see the module docstring)."""
        lay = self.layout(kwargs, query.shape[0], query.shape[2])
        if self.rotate == "allgather":
            k_all, v_all = self.gather_kv(key, value)
            mask = lay.mask(lay.key_index, causal=causal, window=window)
            out = attend(query, k_all, v_all, mask, is_causal=False, scale=scaling, dropout=dropout,
                         softcap=softcap, sinks=sinks)
        else:
            out = self._ring(query, key, value, lay, causal=causal, window=window, scaling=scaling,
                             dropout=dropout, softcap=softcap, sinks=sinks)
        return out.transpose(1, 2).contiguous()

    def _shift(self, block: torch.Tensor) -> torch.Tensor:
        """Send `block` to the next cp rank, receive the previous rank's (async)."""
        from torch.distributed import _functional_collectives as fc

        flat = block.reshape(-1)
        sends = [0] * self.size
        receives = [0] * self.size
        sends[(self.rank + 1) % self.size] = flat.numel()
        receives[(self.rank - 1) % self.size] = flat.numel()
        return fc.all_to_all_single_autograd(flat, receives, sends, self.group)

    def _ring(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lay: CpLayout, *,
              causal: bool, window: int | None, scaling: float | None, dropout: float,
              softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        from torch.distributed import _functional_collectives as fc

        local = query.shape[2]
        block = torch.stack([key, value]).contiguous()
        outs, lses = [], []
        for step in range(self.size):
            pending = self._shift(block) if step < self.size - 1 else None
            source = (self.rank - step) % self.size
            keys = lay.key_index[source * local:(source + 1) * local]
            mask = lay.mask(keys, causal=causal, window=window)
            out, lse = _block_attention(query, block[0], block[1], mask, scaling=scaling,
                                        dropout=dropout, softcap=softcap)
            outs.append(out)
            lses.append(lse)
            if pending is not None:
                block = fc.wait_tensor(pending).view_as(block)
        lse_all = torch.stack(lses)
        lse = torch.logsumexp(lse_all, dim=0)  # [B, H, Tq], over every key of the row
        weights = torch.exp(lse_all - lse)
        merged = (weights[..., None] * torch.stack(outs)).sum(0)
        if sinks is not None:
            # exp(lse) / (exp(lse) + exp(sink)): the keys' share once the sink joins the softmax.
            merged = merged * torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None])[..., None]
        return merged.to(query.dtype)


# A finite "minus infinity": a query row with no allowed key in one ring block gets a
# log-sum-exp near -1e30, so its merge weight is exactly 0 and no NaN reaches autograd
# (every query allows at least itself, in its own block).
_MASKED = -1e30


def _block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     *, scaling: float | None, dropout: float, softcap: float | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring block, in at least float32: (output [B, H, Tq, D], log-sum-exp [B, H, Tq])."""
    acc = torch.promote_types(query.dtype, torch.float32)
    heads = query.shape[1]
    k = repeat_kv_heads(key, heads).to(acc)
    v = repeat_kv_heads(value, heads).to(acc)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.to(acc), k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, _MASKED)
    top = scores.amax(-1, keepdim=True).detach()  # only for stability; lse does not depend on it
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    lse = (top + torch.log(total)).squeeze(-1)
    probs = weights / total
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v), lse


def context_parallel_of(module: nn.Module) -> ContextParallelAttention | None:
    """The context-parallel attention installed on `module`, if any."""
    found = getattr(module, CP_ATTRIBUTE, None)
    return found if isinstance(found, ContextParallelAttention) else None
