"""The op-rule table (meshplan.planner.ops), rule by rule, on traced tiny modules.

Every case is a tiny model traced the way the planner traces (`build_graph` on the meta
device, torch.export) and compiled with a tensor-parallel plan on 2 ranks: `up` is
colwise, so the code between `up` and the rowwise `down` holds a plain tensor sharded
on its last dimension (the features); `body` is that code. Partial-sum cases make
`down` leave a partial sum (`rowwise(output = partial)`) and run `tail` on it. A case
expects either no error at all, or a layout error (E506/E507) with a phrase.

Each case names the rules it exercises. The mutation test drops each rule from the
table, or replaces it by one that accepts anything (returns an unknown layout), and
requires that some case naming that rule then fails: a rule without a test that can
catch its removal fails CI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meshplan.dsl.errors import PlanRejected
from meshplan.planner import compile_plan, ops
from meshplan.planner.graph import ModelGraph, build_graph
from meshplan.planner.layout import UNKNOWN

Body = Callable[["Net", Tensor, Tensor, Tensor], Tensor]
Tail = Callable[["Net", Tensor, Tensor], Tensor]

PLAIN = "  up : colwise\n  down : rowwise\n"
FUSED = "  up : colwise(parts = 2)\n  down : rowwise\n"
PARTIAL = "  up : colwise\n  down : rowwise(output = partial)\n"
LOGITS_PARTIAL = "the model's output (logits) is a partial sum that is never reduced"


class Net(nn.Module):
    """ids → embed (replicated, [2, 48, 16]) → up → body → down → tail → logits."""

    def __init__(self, body: Body, tail: Tail | None, up_features: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.up = nn.Linear(16, up_features, bias=False)
        self.down = nn.Linear(32, 16, bias=False)
        # Projections no rule plans (replicated weights) for the `linear` rule.
        self.mix = nn.Linear(48, 48, bias=False)
        self.wide = nn.Linear(32, 32, bias=False)
        self.tail_proj = nn.Linear(16, 16, bias=False)
        self.tail_bias = nn.Linear(16, 16)
        self.body = body
        self.tail = tail

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        y = self.down(self.body(self, self.up(x), x, input_ids))
        return self.tail(self, y, x) if self.tail is not None else y


@dataclass(frozen=True)
class Case:
    id: str
    rules: tuple[str, ...]  # the table entries this case exercises
    body: Body
    error: str | None = None  # None: the plan is accepted; else a phrase of a layout error
    plan: str = PLAIN
    tail: Tail | None = None
    alone: bool = False  # the error is the only one

    @property
    def up_features(self) -> int:
        return 64 if self.plan == FUSED else 32


def _per_head(heads: Tensor) -> Tensor:
    """[batch, seq, heads, 2·d] cut at fixed offsets into each head's two parts."""
    a, b = heads[..., :4], heads[..., 4:]
    return torch.cat([a.softmax(-1), b], -1).reshape(2, 48, 32)


def _heads(h: Tensor) -> Tensor:
    return h.view(2, 48, 4, 8).transpose(1, 2)  # [batch, heads, seq, head_dim]


def _same(_: Net, h: Tensor, x: Tensor, ids: Tensor) -> Tensor:
    return h


CASES: tuple[Case, ...] = (
    # -- identity: copies and casts keep the layout (partial sums too)
    Case("clone keeps the shard", ("identity",), lambda n, h, x, i: h.clone().softmax(1)),
    Case("a cast keeps the shard, so a softmax over it is caught", ("identity",),
         lambda n, h, x, i: h.double().float().softmax(-1), "`softmax` reduces over sharded dim 2"),
    Case("clone keeps a partial sum partial", ("identity",), _same, LOGITS_PARTIAL, PARTIAL,
         lambda n, y, x: y.clone(), alone=True),
    # -- elementwise: agreeing layouts, broadcasting only along size-1 dims, partial sums
    Case("pointwise ops on one shard", ("elementwise",), lambda n, h, x, i: F.silu(h) * h),
    Case("a full-size replicated operand", ("elementwise",), lambda n, h, x, i: h + h.new_ones(32),
         "with a replicated one of the full size 32"),
    Case("a residual added to a partial sum", ("elementwise",), _same,
         "`add` adds a replicated value to a partial sum", PARTIAL, lambda n, y, x: y + x),
    Case("a non-linear op on a partial sum", ("elementwise",), _same,
         "`relu` is applied to a partial sum that was never reduced", PARTIAL,
         lambda n, y, x: F.relu(y)),
    Case("scaling a partial sum keeps it partial", ("elementwise",), _same, LOGITS_PARTIAL, PARTIAL,
         lambda n, y, x: y * 2.0, alone=True),
    # -- factory: made from shapes, replicated
    Case("a size-1 factory operand broadcasts", ("factory",),
         lambda n, h, x, i: h + h.new_zeros(2, 48, 1)),
    Case("a full-size factory operand does not", ("factory",),
         lambda n, h, x, i: h + h.new_zeros(2, 48, 32), "with a replicated one of the full size 32"),
    # -- new_empty: a buffer sized from its source is laid out like it
    Case("a buffer sized from a shard is sharded", ("new_empty", "copy_"),
         lambda n, h, x, i: h.new_empty(2, 48, 32).copy_(h).softmax(-1), "`softmax` reduces over sharded dim 2"),
    Case("a buffer of another size is replicated", ("new_empty",),
         lambda n, h, x, i: h * h.new_empty(2, 48, 1).fill_(1.0)),
    # -- copy_: the buffer keeps its layout, the source must fit it
    Case("a shard copied into a buffer like it", ("copy_",),
         lambda n, h, x, i: h.new_empty(2, 48, 32).copy_(F.silu(h))),
    Case("a shard copied into a replicated buffer", ("copy_",),
         lambda n, h, x, i: h.new_zeros(2, 48, 32).copy_(h),
         "`copy_` writes a value sharded on dim 2 (plain tensor) into a replicated buffer"),
    # A replicated value that carries a gradient, broadcast over the shard: each rank's
    # backward sums its gradient over its own piece only (DeepSeek's shared rotary key).
    Case("a value with a gradient expanded into a shard", ("copy_",),
         lambda n, h, x, i: h.new_empty(2, 48, 32).copy_(x[..., :1].expand(2, 48, 32)),
         "`copy_` broadcasts a replicated value that carries a gradient over sharded dim 2"),
    Case("a value with a gradient broadcast over a shard", ("elementwise",),
         lambda n, h, x, i: h * x[..., :1], "`mul` broadcasts a replicated value that carries a gradient"),
    # -- reshape: the sharded dim is mapped
    Case("hidden into heads and back", ("reshape",),
         lambda n, h, x, i: h.view(2, 48, 4, 8).softmax(1).reshape(2, 48, 32)),
    Case("the shard lands on the heads dim", ("reshape",),
         lambda n, h, x, i: h.view(2, 48, 4, 8).softmax(2).view(2, 48, 32),
         "`softmax` reduces over sharded dim 2"),
    Case("folding the shard behind another dim", ("reshape",),
         lambda n, h, x, i: h.reshape(2, 48 * 32).reshape(2, 48, 32),
         "folds sharded dim 2 into a larger dimension behind another one"),
    Case("a reshaped partial sum stays partial", ("reshape",), _same, LOGITS_PARTIAL, PARTIAL,
         lambda n, y, x: y.view(2, 48, 4, 4).view(2, 48, 16), alone=True),
    # -- expand: the shard shifts with new leading dims
    Case("expand then reduce the new dim", ("expand",),
         lambda n, h, x, i: h.unsqueeze(0).expand(3, 2, 48, 32).sum(0)),
    Case("expand keeps the shard on the features", ("expand",),
         lambda n, h, x, i: h.unsqueeze(0).expand(3, 2, 48, 32).softmax(-1).sum(0),
         "`softmax` reduces over sharded dim 3"),
    # -- complex_view: the real/imaginary pair folds into the element and back
    Case("complex rotary on sharded heads", ("complex_view",),
         lambda n, h, x, i: torch.view_as_real(torch.view_as_complex(h.view(2, 48, 4, 4, 2))
                                               * torch.polar(x.new_ones(48, 1, 4), x.new_zeros(48, 1, 4)))
         .flatten(2).softmax(1)),
    Case("complex views keep the shard on the features", ("complex_view",),
         lambda n, h, x, i: torch.view_as_real(torch.view_as_complex(h.view(2, 48, 16, 2))).flatten(2)
         .softmax(-1), "`softmax` reduces over sharded dim 2"),
    Case("the real/imaginary pair sharded", ("complex_view",),
         lambda n, h, x, i: torch.view_as_real(torch.view_as_complex(h.view(2, 48, 2, 16).transpose(2, 3)
                                                                     .contiguous())).flatten(2),
         "`view_as_complex` folds sharded dim 3"),
    # -- transpose / t / permute: the shard moves with the dims
    Case("transpose moves the shard", ("transpose",),
         lambda n, h, x, i: h.transpose(1, 2).softmax(2).transpose(1, 2)),
    Case("transpose moves the shard (caught)", ("transpose",),
         lambda n, h, x, i: h.transpose(1, 2).softmax(1).transpose(1, 2),
         "`softmax` reduces over sharded dim 1"),
    Case("t moves the shard", ("t",),
         lambda n, h, x, i: h.reshape(96, 32).t().softmax(1).t().reshape(2, 48, 32)),
    Case("t moves the shard (caught)", ("t",),
         lambda n, h, x, i: h.reshape(96, 32).t().softmax(0).t().reshape(2, 48, 32),
         "`softmax` reduces over sharded dim 0"),
    Case("permute moves the shard", ("permute",),
         lambda n, h, x, i: h.permute(2, 0, 1).softmax(1).permute(1, 2, 0)),
    Case("permute moves the shard (caught)", ("permute",),
         lambda n, h, x, i: h.permute(2, 0, 1).softmax(0).permute(1, 2, 0),
         "`softmax` reduces over sharded dim 0"),
    # -- select: another dim drops out; the sharded one cannot be indexed
    Case("select a leading index", ("select",), lambda n, h, x, i: h.unsqueeze(0)[0]),
    Case("select shifts the shard down", ("select",),
         lambda n, h, x, i: h[:, 0].softmax(-1).unsqueeze(1).expand(2, 48, 32),
         "`softmax` reduces over sharded dim 1"),
    Case("select on the sharded dim", ("select",),
         lambda n, h, x, i: h[:, :, 0].unsqueeze(-1).expand(2, 48, 32),
         "`select` picks one index of sharded dim 2"),
    # -- slice: fixed offsets on the sharded dim (a fused qkv cut by offsets)
    Case("slice the sequence", ("slice",), lambda n, h, x, i: h[:, 1:]),
    Case("slice a fused projection at fixed offsets", ("slice",),
         lambda n, h, x, i: torch.cat([h[..., :16], h[..., 16:]], -1),
         "`slice` cuts sharded dim 2 at fixed offsets"),
    Case("slicing keeps the shard", ("slice",), lambda n, h, x, i: h[:, 1:].softmax(-1),
         "`softmax` reduces over sharded dim 2"),
    # A per-head fused projection (GPT-NeoX's [h0: q k v][h1: q k v]…): viewed into heads
    # first, the shard is on the heads dim and the fixed-offset cut is on another one.
    Case("a per-head fused projection cut after the view into heads", ("reshape", "slice"),
         lambda n, h, x, i: _per_head(h.view(2, 48, 4, 8))),
    Case("a per-head fused projection sharded by parts", ("reshape",),
         lambda n, h, x, i: h.view(2, 48, 4, 16)[..., :8].reshape(2, 48, 32),
         "splits a fused (2-part) sharded dimension: the projection is laid out per head", plan=FUSED),
    # -- split: other dims freely; the sharded dim only into a fused value's parts
    Case("chunk the sequence", ("split",), lambda n, h, x, i: torch.cat(h.chunk(2, 1), 1)),
    Case("chunk a fused projection into its parts", ("split",),
         lambda n, h, x, i: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1], plan=FUSED),
    Case("chunk the sharded dim of a plain projection", ("split",),
         lambda n, h, x, i: torch.cat(h.chunk(2, -1), -1),
         "`chunk` cuts sharded dim 2 into pieces of fixed size"),
    Case("unbind the sharded dim", ("split",), lambda n, h, x, i: torch.stack(h.unbind(2), 2),
         "`unbind` splits sharded dim 2 into single indices"),
    Case("chunks keep the shard", ("split",), lambda n, h, x, i: h.chunk(2, 1)[0].softmax(-1),
         "`softmax` reduces over sharded dim 2"),
    # -- join: same layouts, never along the sharded dim
    Case("cat along the sequence", ("join",), lambda n, h, x, i: torch.cat([h, h], 1)),
    Case("stack shifts the shard", ("join",), lambda n, h, x, i: torch.stack([h, h]).sum(0)),
    Case("cat along the sharded dim", ("join",),
         lambda n, h, x, i: torch.cat([h, h], -1)[..., :32], "`cat` joins along sharded dim 2"),
    Case("cat of different layouts", ("join",),
         lambda n, h, x, i: torch.cat([h, h.new_zeros(2, 48, 32)], 1),
         "`cat` joins values of different layouts"),
    # -- reductions, scans, normalisations over the sharded dim
    Case("mean over the sequence", ("reduction",), lambda n, h, x, i: h - h.mean(1, keepdim=True)),
    Case("sum drops a dim below the shard", ("reduction",),
         lambda n, h, x, i: h.sum(0).softmax(-1).expand(2, 48, 32), "`softmax` reduces over sharded dim 1"),
    Case("mean over the features", ("reduction",), lambda n, h, x, i: h - h.mean(-1, keepdim=True),
         "`mean` reduces over sharded dim 2"),
    Case("softmax over the sequence", ("scan",), lambda n, h, x, i: h.softmax(1)),
    Case("cumsum over the features", ("scan",), lambda n, h, x, i: h.cumsum(-1),
         "`cumsum` reduces over sharded dim 2"),
    Case("layer norm of a sequence-sharded value", ("normalization",),
         lambda n, h, x, i: F.layer_norm(h.transpose(1, 2), (48,)).transpose(1, 2)),
    Case("layer norm over the sharded features", ("normalization",),
         lambda n, h, x, i: F.layer_norm(h, (32,)), "`layer_norm` reduces over sharded dim 2"),
    # -- linear: a projection without a rule has a replicated weight
    Case("an unplanned projection over the sequence", ("linear",),
         lambda n, h, x, i: n.mix(h.transpose(1, 2)).transpose(1, 2)),
    Case("an unplanned projection over the sharded features", ("linear",),
         lambda n, h, x, i: n.wide(h),
         "a projection with no rule gets its input sharded over the features it contracts"),
    Case("a projection without bias keeps a partial sum", ("linear",), _same, LOGITS_PARTIAL, PARTIAL,
         lambda n, y, x: n.tail_proj(y), alone=True),
    Case("a projection with bias on a partial sum", ("linear",), _same,
         "a projection with a bias gets a partial sum", PARTIAL, lambda n, y, x: n.tail_bias(y)),
    # -- matmul / addmm: contractions
    Case("a matmul keeping the shard", ("matmul",),
         lambda n, h, x, i: (h.transpose(1, 2) @ x).transpose(1, 2)),
    Case("a matmul contracting the shard alone", ("matmul",),
         lambda n, h, x, i: h @ h.new_ones(32, 32),
         "contracts a dimension that only one operand has sharded"),
    Case("a partial product times a sharded value", ("matmul",),
         lambda n, h, x, i: (h @ h.transpose(1, 2)) @ h, "multiplies a partial sum by a sharded value"),
    Case("addmm keeping the shard", ("addmm",),
         lambda n, h, x, i: torch.addmm(h.new_zeros(1), x.reshape(96, 16),
                                        h.reshape(96, 32)[:16]).reshape(2, 48, 32)),
    Case("addmm contracting the shard alone", ("addmm",),
         lambda n, h, x, i: torch.addmm(h.new_zeros(1), h.reshape(96, 32),
                                        h.new_ones(32, 32)).reshape(2, 48, 32),
         "contracts a dimension that only one operand has sharded"),
    Case("addmm adding a partial sum", ("addmm",), _same,
         "`addmm` is applied to a partial sum that was never reduced", PARTIAL,
         lambda n, y, x: torch.addmm(y.reshape(96, 16), x.reshape(96, 16),
                                     x.new_ones(16, 16)).reshape(2, 48, 16)),
    # -- attention: heads only
    Case("attention over sharded heads", ("attention",),
         lambda n, h, x, i: F.scaled_dot_product_attention(_heads(h), _heads(h), _heads(h))
         .transpose(1, 2).reshape(2, 48, 32)),
    Case("attention over a sharded head size", ("attention",),
         lambda n, h, x, i: F.scaled_dot_product_attention(*(h.unsqueeze(1),) * 3).squeeze(1),
         "the scores need whole heads"),
    Case("attention over a sharded sequence", ("attention",),
         lambda n, h, x, i: F.scaled_dot_product_attention(*(h.transpose(1, 2).unsqueeze(1),) * 3)
         .squeeze(1).transpose(1, 2),
         "each rank would attend only to its own tokens"),
    # -- embedding: the output follows the ids; a sharded table needs a rule
    Case("embedding of sharded ids", ("embedding",),
         lambda n, h, x, i: F.embedding((h > 0).long(), h.new_zeros(2, 4)).sum(-1)),
    Case("embedding with a sharded table", ("embedding",),
         lambda n, h, x, i: F.embedding(i, h.reshape(96, 32)),
         "an embedding table without a rule is sharded"),
    # -- no rule: reported when a sharded or partial value is touched, silent otherwise
    Case("an op without a rule on a sharded value", (), lambda n, h, x, i: torch.flip(h, [1]),
         "no layout rule for `flip` on sharded on dim 2 (plain tensor)"),
    # (detached: a replicated value with a gradient broadcast over the shard is refused, below)
    Case("an op without a rule on replicated values", (),
         lambda n, h, x, i: h * torch.flip(x.detach(), [1]).sum(-1, keepdim=True)),
    Case("an op without a rule on a partial sum", (), _same,
         "`flip` is applied to a partial sum that was never reduced", PARTIAL,
         lambda n, y, x: torch.flip(y, [1])),
)


@cache
def _graph(case: Case) -> ModelGraph:
    with torch.device("meta"):
        model = Net(case.body, case.tail, case.up_features)
    return build_graph(model)


def _errors(case: Case) -> list[str] | None:
    """The layout errors compiling the case gives (None: it does not compile for another
    reason, which no case expects)."""
    text = "plan rules for Net\nmesh {\n  tp = 2\n}\ntensor_parallel on tp {\n" + case.plan + "}\n"
    try:
        compile_plan(text, _graph(case), 2)
    except PlanRejected as rejected:
        if any(d.code not in ("E506", "E507") for d in rejected.errors):
            return None
        return [d.message for d in rejected.errors]
    return []


def _holds(case: Case) -> bool:
    errors = _errors(case)
    if errors is None:
        return False
    if case.error is None:
        return errors == []
    found = any(case.error in m for m in errors)
    return found and (len(errors) == 1 or not case.alone)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule(case: Case) -> None:
    assert _holds(case), f"{case.id}: expected {case.error or 'no error'}, got {_errors(case)}"


def test_every_op_has_one_rule_and_every_rule_says_what_it_guarantees() -> None:
    owners: dict[str, list[str]] = {}
    for name, rule in ops.RULES.items():
        assert rule.ops, name
        assert (rule.apply.__doc__ or "").strip(), f"the `{name}` rule has no docstring"
        for op in rule.ops:
            owners.setdefault(op, []).append(name)
    assert {op: names for op, names in owners.items() if len(names) > 1} == {}
    assert {r for c in CASES for r in c.rules} <= set(ops.RULES)


def _permissive(rule: ops.OpRule) -> ops.OpRule:
    """A rule that accepts every input, partial sums included, and claims nothing."""
    return ops.OpRule(rule.ops, lambda call: UNKNOWN, takes_partial=True, fresh=rule.fresh)


@pytest.mark.parametrize("mutation", ["dropped", "permissive"])
@pytest.mark.parametrize("rule", sorted(ops.RULES))
def test_each_rule_is_needed(rule: str, mutation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the rule (or with one that accepts anything) some case of it fails."""
    cases = [c for c in CASES if rule in c.rules]
    assert cases, f"the `{rule}` rule has no case in tests/test_op_rules.py"
    assert all(_holds(c) for c in cases)
    if mutation == "dropped":
        monkeypatch.delitem(ops.RULES, rule)
    else:
        monkeypatch.setitem(ops.RULES, rule, _permissive(ops.RULES[rule]))
    failing = [c.id for c in cases if not _holds(c)]
    assert failing, f"every case of `{rule}` still holds with the rule {mutation}"
