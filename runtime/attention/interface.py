"""The one adapter between transformers' attention interface and meshplan's backends.

transformers calls an attention function as

    fn(module, query, key, value, attention_mask, dropout=, scaling=, sliding_window=,
       softcap=, is_causal=, **kwargs) -> (output [B, T, H, D], None)

with query `[B, H, T, D]` and key/value `[B, Hkv, T, D]`. `attention_function(name,
local=, context_parallel=)` builds such a function from a backend's two paths: it reads
the arguments once into an `AttentionCall` (causality decided the same way for every
backend), and hands the call to `context_parallel(call, cp)` when the plan's
ContextParallel step installed a `ContextParallelAttention` on the module, to
`local(call)` otherwise. A backend therefore never spells out transformers' signature.

Attention sinks (GPT-OSS, MiMo-V2-Flash, Granite-SWA, ...: the model passes its learned
per-head sink logits as `s_aux`) become `AttentionCall.sinks`, checked to hold one logit
per query head the call sees (the local heads under tensor parallelism), and leave
`kwargs`. A backend that cannot apply them refuses the call with `refuse_sinks`
(`NotImplementedError` naming it); `meshplan_sdpa` applies them on both paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .context import ContextParallelAttention, context_parallel_of

__all__ = ["AttentionCall", "AttentionFunction", "attention_function"]

AttentionFunction = Callable[..., tuple[torch.Tensor, None]]


@dataclass(frozen=True)
class AttentionCall:
    """One call of an attention layer, as transformers made it."""

    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    dropout: float
    scaling: float | None
    sliding_window: int | None  # as given (transformers may pass 0 or None for "no window")
    softcap: float | None
    causal: bool
    kwargs: Mapping[str, Any]  # the rest: packing info, cp_* tensors, ...
    sinks: torch.Tensor | None = None  # [H] sink logits (transformers' `s_aux`), None for none

    def __post_init__(self) -> None:
        if self.sinks is None:
            return
        heads = self.query.shape[1]
        if not isinstance(self.sinks, torch.Tensor) or tuple(self.sinks.shape) != (heads,):
            got = list(self.sinks.shape) if isinstance(self.sinks, torch.Tensor) else type(self.sinks).__name__
            raise ValueError(
                f"attention sinks (s_aux) must hold one logit per query head, shape [{heads}], "
                f"got {got}; under tensor parallelism the sinks are cut with the heads"
            )

    def refuse_sinks(self, backend: str, why: str) -> None:
        """Raise `NotImplementedError` when this call has attention sinks that `backend`
        cannot apply (`why` says what its kernel lacks)."""
        if self.sinks is not None:
            raise NotImplementedError(
                f"{backend} does not implement attention sinks (s_aux): {why}; "
                "use meshplan_sdpa for this model"
            )

    @property
    def window(self) -> int | None:
        """The sliding window in tokens, None for none."""
        return int(self.sliding_window) if self.sliding_window else None

    def context_parallel(self, cp: ContextParallelAttention, *,
                         softcap: float | None = None) -> torch.Tensor:
        """meshplan's exact context-parallel attention of this call, `[B, Tl, H, D]`."""
        return cp.attend(self.query, self.key, self.value, self.kwargs, causal=self.causal,
                         window=self.window, scaling=self.scaling, dropout=self.dropout,
                         softcap=self.softcap if softcap is None else softcap, sinks=self.sinks)


def attention_function(
    name: str,
    *,
    local: Callable[[AttentionCall], torch.Tensor],
    context_parallel: Callable[[AttentionCall, ContextParallelAttention], torch.Tensor],
) -> AttentionFunction:
    """transformers' attention function for a backend named `name` (see the module
    docstring); both paths return `[B, T, H, D]`."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        sinks = kwargs.pop("s_aux", None)
        call = AttentionCall(
            module=module, query=query, key=key, value=value, attention_mask=attention_mask,
            dropout=dropout, scaling=scaling, sliding_window=sliding_window, softcap=softcap,
            # Causal unless transformers or the module says otherwise.
            causal=bool(getattr(module, "is_causal", True) if is_causal is None else is_causal),
            kwargs=kwargs, sinks=sinks,
        )
        cp = context_parallel_of(module)
        out = local(call) if cp is None else context_parallel(call, cp)
        return out, None

    attention.__name__ = attention.__qualname__ = f"{name}_attention"
    return attention
