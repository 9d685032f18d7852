"""Expert parallelism: each ep rank holds E/ep of a layer's experts and tokens travel to them.

transformers 5 stores a layer's experts as one module (`mlp.experts`) with 3-D parameters
`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`; the router
(`mlp.gate`) and DeepSeek-V3's shared experts stay ordinary dense modules. This module
replaces that call, nothing else, so routing runs exactly as in one process.

The expert mesh (`expert_mesh`): the ranks of dp_shard × cp × tp (the "pool", row-major in
the Program's order, tp innermost) cut into (efsdp, ep), ep innermost; dp_replicate stays
outside. Expert parameters become `Shard(0)` DTensors on `ep`; FSDP2 may shard them further
on `efsdp` (× dp_replicate: HSDP).

One forward, for an ep group of size `ep` owning E/ep experts each:
1. token replicas: where the group's ranks hold the same tokens (tp ranks; `replicas`),
   each keeps a 1/d slice of them (`_ReplicaSplit`: backward all-gathers the gradient so
   that every replica sees the whole, as a replicated value's gradient must be);
2. assignments (token, k) are sorted by expert; counts go first (`all_to_all_single` of
   the per-expert counts), then the token rows with those uneven splits
   (`all_to_all_single_autograd`: its backward is the reverse exchange);
   `dispatch = allgather` sends every row to every rank instead and each keeps its
   experts' rows;
3. the local experts run (`torch.nn.functional.grouped_mm` when the rows are 16-byte
   aligned, else a loop over local experts: both exact);
4. results come back by the reverse exchange, are put back in (token, k) order, gathered
   over the token replicas (`_ReplicaGather`: backward keeps this rank's slice), and only
   then weighted by the router's `top_k_weights` and summed over k — on every rank, for
   every token, so the router's gradient is the whole one on every replica and FSDP's
   ordinary reduction over the data-parallel ranks is the only one it needs.

Gradients of the experts: an expert's rows come from every rank of its ep group, so its
local gradient is already a sum over those ranks' tokens; FSDP over efsdp sums the rest,
and `gradient_divide_factor` (the dense parameters' divisor, times the tp/d copies of
each token set) makes it the dense parameters' average (applied as a gradient scale
before FSDP's own average, since gloo cannot pre-multiply a reduction).

`load_balancing_loss` is the Switch/Mixtral auxiliary loss over the GLOBAL batch: tokens
per expert and router probabilities are summed over the data-parallel group before the
product, so every rank holds the value one process computes on the whole batch.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "EXPERT_PARAMS",
    "ExpertGroups",
    "ExpertParallelError",
    "expert_mesh",
    "install_expert_parallel",
    "load_balancing_loss",
    "local_experts_forward",
]

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
EXPERT_MESH_DIMS = ("dp_replicate", "efsdp", "ep")


class ExpertParallelError(ValueError):
    """The model or mesh cannot be expert-parallel as the Program says."""


# --------------------------------------------------------------------------- the mesh


def expert_mesh(mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """The (dp_replicate, efsdp, ep) mesh over the same ranks as the Program's `mesh`.

    Every rank must call this (it creates process groups). `pp` must be 1."""
    names = tuple(mesh.mesh_dim_names or ())
    ranks = mesh.mesh
    sizes = dict(zip(names, ranks.shape, strict=True))
    if sizes.get("pp", 1) != 1:
        raise ExpertParallelError("expert parallelism with pipeline stages is not supported")
    replicate = sizes.get("dp_replicate", 1)
    pool = math.prod(sizes.get(d, 1) for d in ("dp_shard", "cp", "tp"))
    if pool % ep:
        raise ExpertParallelError(f"ep = {ep} does not divide dp_shard × cp × tp = {pool}")
    # The Program's mesh lists its dimensions in canonical order (pp, dp_replicate,
    # dp_shard, cp, tp), so a row-major reshape keeps tp innermost inside the pool.
    layout = ranks.reshape(replicate, pool // ep, ep)
    from .mesh import mesh_over

    # The dry run's mesh holds only its rank's groups: so does its expert mesh.
    return mesh_over(mesh, layout, EXPERT_MESH_DIMS)


@dataclass
class ExpertGroups:
    """What the experts' forward needs about the ranks: the ep group and the replica group."""

    ep_group: dist.ProcessGroup
    ep: int
    ep_rank: int
    replica_group: dist.ProcessGroup | None  # ranks of the ep group holding the same tokens
    replicas: int
    replica_rank: int
    dispatch: str
    grad_scale: float = 1.0


def _replica_groups(em: DeviceMesh, mesh: DeviceMesh, replicated: Sequence[str]) -> tuple[
        dist.ProcessGroup | None, int, int]:
    """Consecutive ranks of one ep group that hold the same tokens (they differ only in
    the replicated dimensions, tp): d = min(ep, tp) of them, which must divide both."""
    names = tuple(mesh.mesh_dim_names or ())
    size = math.prod(int(mesh.mesh.shape[names.index(d)]) for d in replicated if d in names)
    ep = em["ep"].size()
    if size <= 1:
        return None, 1, 0
    d = min(ep, size)
    if ep % d or size % d:
        raise ExpertParallelError(f"ep = {ep} and the token replicas ({' × '.join(replicated)} = {size}) "
                                  "must divide one another")
    from .mesh import rank_only

    flat = em.mesh.reshape(-1, d)
    mine = None
    me = dist.get_rank()
    rows = flat.tolist()
    if rank_only(mesh):  # the dry run: no other rank exists to create the others
        rows = [row for row in rows if me in row]
    for row in rows:  # every rank creates every group, in the same order
        group = dist.new_group(row)
        if me in row:
            mine = group, row.index(me)
    assert mine is not None
    return mine[0], d, mine[1]


# ----------------------------------------------------------------- autograd exchanges


def _gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x` (rank i has `sizes[i]` rows) on every rank."""
    n = len(sizes)
    out = x.new_empty((sum(sizes), *x.shape[1:]))
    send = x.repeat(n, *([1] * (x.dim() - 1))) if n > 1 else x
    dist.all_to_all_single(out, send.contiguous(), output_split_sizes=sizes,
                           input_split_sizes=[x.shape[0]] * n, group=group)
    return out


class _ReplicaSplit(torch.autograd.Function):
    """Forward: this rank's slice of a replicated tensor. Backward: every replica's slice
    gradient gathered, so the replicated input gets the same whole gradient everywhere."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:rank])
        return x[start:start + sizes[rank]].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None, None


class _ReplicaGather(torch.autograd.Function):
    """Forward: the replicas' slices gathered into the whole. Backward: this rank's slice
    (a replicated value's gradient is the same whole on every replica: summing would
    count it d times)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return _gather_rows(x.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad[ctx.start:ctx.start + ctx.size].contiguous(), None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` (FSDP2 on gloo cannot divide by an
    arbitrary factor: the experts' divisor is applied here, before its reduction)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class _AllReduce(torch.autograd.Function):
    """Sum over `group`; the backward sums the gradients too (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    out = all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return wait_tensor(out)


# ------------------------------------------------------------------- local experts


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0
               for t in tensors if t.dim() >= 2)


def local_experts_forward(module: nn.Module, rows: torch.Tensor, counts: list[int],
                          grad_scale: float = 1.0) -> torch.Tensor:
    """Run this rank's experts on `rows`, sorted by local expert (`counts[e]` rows each)."""
    gate_up, down = (_local(getattr(module, name)) for name in EXPERT_PARAMS)
    if grad_scale != 1.0:
        gate_up, down = _ScaleGrad.apply(gate_up, grad_scale), _ScaleGrad.apply(down, grad_scale)
    act: Callable[[torch.Tensor], torch.Tensor] = module.act_fn  # type: ignore[assignment]
    grouped = getattr(torch.nn.functional, "grouped_mm", None)
    offsets = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
    # (An expert without rows still runs, on an empty slice: its gradient is then zeros,
    # not None, so every rank hands FSDP the same set of gradients to reduce.)
    if grouped is not None and rows.dtype == gate_up.dtype and min(counts, default=0) > 0:
        up_w, down_w = gate_up.transpose(1, 2), down.transpose(1, 2)
        if _aligned(rows, up_w, down_w):
            try:
                h = grouped(rows, up_w, offs=offsets)
                g, u = h.chunk(2, dim=-1)
                mid = (act(g) * u).contiguous()
                if _aligned(mid):
                    return grouped(mid, down_w, offs=offsets)
            except (RuntimeError, NotImplementedError):
                pass  # an unsupported layout or dtype: the loop below is exact
    outputs = []
    start = 0
    for e, n in enumerate(counts):
        part = rows[start:start + n]
        start += n
        g, u = nn.functional.linear(part, gate_up[e]).chunk(2, dim=-1)
        outputs.append(nn.functional.linear(act(g) * u, down[e]))
    return torch.cat(outputs)


def _dispatch_forward(module: nn.Module, groups: ExpertGroups, hidden: torch.Tensor,
                      top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    tokens, k = top_k_index.shape
    num_experts = int(getattr(module, "num_experts"))  # noqa: B009 (a Module attribute mypy cannot type)
    local = num_experts // groups.ep
    sizes: list[int] = []
    x, idx = hidden, top_k_index
    if groups.replica_group is not None:
        sizes = [len(c) for c in torch.arange(tokens).tensor_split(groups.replicas)]
        x = _ReplicaSplit.apply(hidden, sizes, groups.replica_rank, groups.replica_group)
        start = sum(sizes[:groups.replica_rank])
        idx = top_k_index[start:start + sizes[groups.replica_rank]]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = x[order // k]  # one row per (token, k) assignment, sorted by expert
    counts = torch.bincount(flat, minlength=num_experts)
    if groups.dispatch == "alltoall":
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=groups.ep_group)  # counts first
        recv_counts = recv.view(groups.ep, local)
        send_splits = counts.view(groups.ep, local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = _exchange(rows, recv_splits, send_splits, groups.ep_group)
        sources = recv_counts
    else:
        every = _gather_rows(counts, [num_experts] * groups.ep, groups.ep_group).view(groups.ep, num_experts)
        n_rows = every.sum(1).tolist()
        mine = slice(groups.ep_rank * local, (groups.ep_rank + 1) * local)
        # Every rank gets every row; it keeps the rows of its own experts.
        gathered = _exchange(rows.repeat(groups.ep, 1), n_rows, [rows.shape[0]] * groups.ep,
                             groups.ep_group)
        starts = torch.cumsum(every, 1) - every  # first row of expert e from source s
        keep = torch.cat([torch.arange(int(starts[s, mine.start]), int(starts[s, mine.start]) + int(
            every[s, mine].sum()), device=rows.device) + int(sum(n_rows[:s])) for s in range(groups.ep)])
        received = gathered[keep]
        sources = every[:, mine]
    # Received rows are grouped by source, then by expert: regroup by expert.
    expert_of = torch.arange(local, device=rows.device).repeat(groups.ep).repeat_interleave(sources.reshape(-1))
    by_expert = torch.argsort(expert_of, stable=True)
    out = local_experts_forward(module, received[by_expert], sources.sum(0).tolist(), groups.grad_scale)
    back = torch.empty_like(out).index_copy(0, by_expert, out) if out.shape[0] else out
    if groups.dispatch == "alltoall":
        returned = _exchange(back, send_splits, recv_splits, groups.ep_group)
    else:
        full = back.new_zeros((gathered.shape[0], back.shape[1])).index_copy(0, keep, back)
        pieces = _exchange(full, [rows.shape[0]] * groups.ep, n_rows, groups.ep_group)
        returned = pieces.view(groups.ep, rows.shape[0], -1).sum(0)
    per_assignment = torch.empty_like(returned).index_copy(0, order, returned).view(-1, k, returned.shape[-1])
    if groups.replica_group is not None:
        per_assignment = _ReplicaGather.apply(per_assignment, sizes, groups.replica_rank, groups.replica_group)
    # Weighted as one process does: in the promoted dtype (the router's weights are fp32).
    weighted = per_assignment * top_k_weights.unsqueeze(-1)
    return weighted.sum(1).to(hidden.dtype)


# ------------------------------------------------------------------------ install


def _check_experts(fqn: str, module: nn.Module, ep: int) -> None:
    for name in EXPERT_PARAMS:
        p = getattr(module, name, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            raise ExpertParallelError(f"`{fqn}` ({type(module).__name__}) has no 3-D `{name}`: expert "
                                      "parallelism shards transformers' fused experts")
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or n % ep:
        raise ExpertParallelError(f"`{fqn}`: {n} experts cannot be split {ep} ways")
    if any(getattr(module, f"{name}_bias", None) is not None for name in EXPERT_PARAMS):
        raise ExpertParallelError(f"`{fqn}`: experts with biases are not supported")


def _shard_experts(module: nn.Module, ep_mesh: DeviceMesh) -> None:
    from torch.distributed.tensor import DTensor, Shard

    rank, ep = ep_mesh.get_local_rank(), ep_mesh.size()
    for name in EXPERT_PARAMS:
        full = getattr(module, name)
        rows = full.shape[0] // ep
        local = full.detach()[rank * rows:(rank + 1) * rows].clone()
        dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                stride=full.stride())
        module.register_parameter(name, nn.Parameter(dt, requires_grad=full.requires_grad))


def install_expert_parallel(model: nn.Module, mesh: DeviceMesh, fqns: Sequence[str], ep: int, *,
                            dispatch: str = "alltoall", replicas: Sequence[str] = (),
                            fsdp: bool = False, hsdp: bool = False, reshard_after_forward: bool = True,
                            gradient_divide_factor: int = 1, mp_policy: Any = None) -> DeviceMesh:
    """Make the experts `fqns` expert-parallel over `ep` ranks; returns the expert mesh.

    Call after tensor parallelism and before the dense FSDP units (the experts' own unit
    must exist before their layer's, which then leaves their parameters alone)."""
    em = expert_mesh(mesh, ep)
    ep_mesh = em["ep"]
    replica_group, d, replica_rank = _replica_groups(em, mesh, tuple(replicas))
    fsdp_mesh = (em["dp_replicate", "efsdp"] if hsdp else em["efsdp"]) if fsdp else None
    # FSDP averages the experts' gradients over its mesh; they must be divided by
    # `gradient_divide_factor` instead.
    scale = fsdp_mesh.size() / gradient_divide_factor if fsdp_mesh is not None else 1.0
    groups = ExpertGroups(ep_mesh.get_group(), ep, ep_mesh.get_local_rank(), replica_group, d,
                          replica_rank, dispatch, scale)
    for fqn in fqns:
        module = model.get_submodule(fqn)
        _check_experts(fqn, module, ep)
        _shard_experts(module, ep_mesh)

        def forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
            return _dispatch_forward(self, groups, hidden_states, top_k_index, top_k_weights)

        module.forward = types.MethodType(forward, module)
        if fsdp_mesh is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            fully_shard(module, mesh=fsdp_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=mp_policy or MixedPrecisionPolicy())
    return em


# --------------------------------------------------------------- load balancing


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int,
                        group: dist.ProcessGroup | None = None, *,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixtral's / Qwen3-MoE's auxiliary loss (`load_balancing_loss_func`) over the global batch.

    Per layer: softmax of the router logits, top-k assignments; the counts per expert,
    the probability sums and the token count are summed over every layer and, with a
    `group`, over its ranks (the data-parallel ranks: dp × cp) before
    `E · Σ_e f_e · P_e`, so every rank gets the value of one process on all the tokens.
    The probability sums travel by an all-reduce whose backward sums too: with the
    gradients averaged over the same ranks (FSDP), the router gets the global gradient."""
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32) if attention_mask is not None else None
    for logits in router_logits:
        weights = torch.softmax(_local(logits).float(), dim=-1)
        _, chosen = torch.topk(weights, top_k, dim=-1)
        w = mask if mask is not None else torch.ones(weights.shape[0], device=device)
        counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (weights * w.unsqueeze(-1)).sum(0)
        rows = rows + w.sum()
    if group is not None and dist.get_world_size(group) > 1:
        stats = torch.cat([counts, rows.reshape(1)]).detach()
        dist.all_reduce(stats, group=group)
        counts, rows = stats[:-1], stats[-1]
        probs = _AllReduce.apply(probs, group)
    return torch.sum((counts / rows) * (probs / rows)) * num_experts
