"""One pipeline stage's module: a Hugging Face decoder-only causal LM's modules for a
slice of its layers, under their own names, run by the decoder's own loop (see
`runtime.parallel.pipeline`, which cuts the model into these).

Torch alone (no meshplan import): `plan compile --emit python` writes this module's body
into the standalone script (`planner/emitted_styles.py` holds the copy, held equal by
`tests/test_registry.py`), so the script's stages are the runtime's very code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class _Decoder(nn.Module):
    """The `model.` part of a stage: the Hugging Face decoder's modules this stage runs."""

    rotary_emb: nn.Module
    layers: nn.ModuleDict
    embed_tokens: nn.Module
    norm: nn.Module


class StageModule(nn.Module):
    """One pipeline stage of a decoder-only causal LM (see the module docstring).

    Inputs: `(input_ids, position_ids)` on the first stage, `(hidden, position_ids)` on the
    others. Outputs: `(hidden, position_ids)`, or the logits on the last stage.
    """

    model: _Decoder
    lm_head: nn.Module
    config: Any

    def __init__(self, model: nn.Module, layers: Sequence[int], *, first: bool, last: bool) -> None:
        super().__init__()
        inner: Any = model.model
        self.first, self.last = first, last
        self.config = model.config
        # Same FQNs as the Hugging Face model: `model.<...>` and `lm_head`.
        self.model = _Decoder()
        self.model.rotary_emb = inner.rotary_emb
        self.model.layers = nn.ModuleDict({str(i): inner.layers[i] for i in layers})
        if first:
            self.model.embed_tokens = inner.embed_tokens
        if last:
            self.model.norm = inner.norm
            self.lm_head = getattr(model, "lm_head")  # noqa: B009 (a submodule, typed as one)
        # Gemma-style models scale embeddings by sqrt(hidden) inside their forward.
        self.embed_scale = float(self.config.hidden_size) ** 0.5 if _scales_embeddings(model) else None
        self.final_softcap = getattr(self.config, "final_logit_softcapping", None)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        # A fresh tensor per forward pass: after the first stage, `position_ids` is the
        # schedule's receive buffer of this microbatch, the same tensor every step, which
        # `dist.recv` overwrites without bumping its version counter, so the attention
        # backend's per-pass segment cache (keyed on the tensor and its version) would
        # take a step's new boundaries for an earlier step's.
        position_ids = position_ids.clone()
        if self.first:
            hidden = self.model.embed_tokens(x)
            if self.embed_scale is not None:
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        else:
            hidden = x
        embeddings = self.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.model.layers.values():
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids,
                           position_embeddings=embeddings)
        if not self.last:
            return hidden, position_ids
        logits = self.lm_head(self.model.norm(hidden))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def _scales_embeddings(model: nn.Module) -> bool:
    return str(getattr(model.config, "model_type", "")).startswith("gemma")
