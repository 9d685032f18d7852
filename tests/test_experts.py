"""Expert parallelism is exact: 4 gloo ranks against one process, on every rank.

For tiny Mixtral, Qwen3-MoE and DeepSeek-V3 (shared experts, sigmoid routing with a
non-zero fp32 score-correction bias), under ep 2 and ep 4 over dp_shard 4, ep 2 with
HSDP (dp_replicate 2 × dp_shard 2, the experts sharded over ep), and ep 2 with
tensor-parallel attention (dp_shard 2 × tp 2: the ep group is the tp group, whose
replicated tokens each rank routes half of; DeepSeek's latent attention split over
heads, its shared rotary key's gradient summed by `mla_kv_a`, see ATTENTION_TP): the logits of this rank's rows, the loss
(cross-entropy plus the load-balancing loss over the global batch, where the model has
one) and every parameter's gradient equal one process's within 1e-5 (fp32). With
context parallelism (dp_shard 2 × cp 2, ep 2 over the cp ranks, which hold different
parts of the same sequences), one training step with the balancing loss over dp × cp
gives one process's loss and gradients on every rank.

Each rank builds the model as `plan run` does (`build_applied`: meta model, Program,
local shards, layout-independent random weights), so the one-process model has the
same weights; the gradients are compared by `tests.truth`'s comparison (DTensor shards
against the matching slices).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from tests.distributed import RankPool, rank_pool_fixture

pytestmark = pytest.mark.slow

TOL = 1e-5
ROWS, SEQ = 4, 16
AUX_COEF = 0.1  # large enough for the balancing loss to matter in the gradients

pool = rank_pool_fixture(4, timeout=240.0)

ARCH = {"tiny-mixtral": "MixtralForCausalLM", "tiny-qwen3-moe": "Qwen3MoeForCausalLM",
        "tiny-deepseek-v3": "DeepseekV3ForCausalLM"}
ATTENTION_TP = {
    "tiny-mixtral": ["model.layers.*.self_attn.{q,k,v}_proj : colwise",
                     "model.layers.*.self_attn.o_proj : rowwise"],
    "tiny-qwen3-moe": ["model.layers.*.self_attn.{q,k,v}_proj : colwise",
                       "model.layers.*.self_attn.{q,k}_norm : replicate(input = shard(2), output = shard(2))",
                       "model.layers.*.self_attn.o_proj : rowwise"],
    # Latent attention split over heads: the rotary key part of `kv_a_proj_with_mqa` is
    # shared by every head, so its gradient is a partial sum per tp rank (wrong without a
    # rule: tests/plans/broken/ep_deepseek_mla_tp.plan); `mla_kv_a` sums it.
    "tiny-deepseek-v3": ["model.layers.*.self_attn.{q_b,kv_b}_proj : colwise",
                         "model.layers.*.self_attn.kv_a_proj_with_mqa : mla_kv_a(rope = 8)",
                         "model.layers.*.self_attn.o_proj : rowwise"],
}
MESHES = {
    "ep2": ("dp_shard = 4\n  ep = 2", "dp_shard"),
    "ep4": ("dp_shard = 4\n  ep = 4", "dp_shard"),
    "ep2_hsdp": ("dp_replicate = 2\n  dp_shard = 2\n  ep = 2", "(dp_replicate, dp_shard)"),
    "ep2_tp2": ("dp_shard = 2\n  tp = 2\n  ep = 2", "dp_shard"),
}


def plan_text(model: str, layout: str, dispatch: str = "alltoall") -> str:
    mesh, fsdp_on = MESHES[layout]
    tp = ""
    if "tp" in layout and ATTENTION_TP[model]:
        rules = "\n  ".join(ATTENTION_TP[model])
        tp = f"tensor_parallel on tp {{\n  {rules}\n}}\n"
    return (f"plan moe for {ARCH[model]}\nmesh {{\n  {mesh}\n}}\n{tp}"
            f"fully_shard on {fsdp_on} {{\n  unit model.layers.*\n  root\n}}\n"
            f"expert_parallel on ep {{\n  experts model.layers.*.mlp.experts\n  dispatch = {dispatch}\n}}\n")


# ----------------------------------------------------------------------------- both sides


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (ROWS, SEQ), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((ROWS, 1), -100)], dim=1)
    return ids, labels


def _set_bias(model: torch.nn.Module) -> None:
    """A non-zero score-correction bias (DeepSeek-V3), the same on every rank: it changes
    which experts win, so a rank that ignored it would route differently."""
    g = torch.Generator().manual_seed(3)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.rand(buf.shape, generator=g) * 0.5)


def _loss(model: torch.nn.Module, out: Any, labels: torch.Tensor, total: int, group: Any,
          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, cross-entropy over the global batch, balancing loss)."""
    from meshplan.runtime.parallel.experts import load_balancing_loss
    from meshplan.runtime.train.loss import loss_sum_and_count

    ce_sum, _ = loss_sum_and_count(out.logits, labels)
    config = model.config
    aux = torch.zeros(())
    if getattr(out, "router_logits", None):
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        aux = load_balancing_loss(out.router_logits, experts, config.num_experts_per_tok, group)
    return ce_sum * (scale / total) + AUX_COEF * aux, ce_sum.detach() / total, aux.detach()


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids}
    if hasattr(model.config, "output_router_logits"):
        kwargs["output_router_logits"] = True
    return model(**kwargs)


@functools.cache
def reference(model_name: str) -> dict[str, Any]:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from meshplan.runtime import build_model, prepare
    from meshplan.runtime.weights.loading import canonical_name
    from tests.truth import FLOOR, Reference

    torch.set_num_threads(1)
    model = build_model(model_name, seed=0)
    prepare(model)
    _set_bias(model)
    ids, labels = _batch()
    out = _forward(model, ids)
    total = int((labels != -100).sum())
    loss, ce, aux = _loss(model, out, labels, total, None, 1.0)
    if getattr(out, "router_logits", None):
        config = model.config
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        theirs = load_balancing_loss_func(out.router_logits, experts, config.num_experts_per_tok)
        assert abs(float(theirs.detach()) - float(aux)) <= 1e-6 * abs(float(aux)), (float(theirs.detach()), float(aux))
    loss.backward()
    grads = {canonical_name(n): p.grad.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)
             if p.grad is not None}
    norms = [float(g.norm()) for g in grads.values()]
    rms = (sum(n * n for n in norms) / len(norms)) ** 0.5
    return {"logits": out.logits.detach().clone(), "ce": float(ce), "aux": float(aux),
            "ref": Reference(float(ce), 0.0, grads, FLOOR * rms)}


def rank_case(program_json: str, model_name: str, ref: dict[str, Any]) -> dict[str, Any]:
    from meshplan.planner.program import Program
    from meshplan.runtime import Topology, build_applied
    from tests.truth import _compare_grads

    program = Program.from_json(program_json)
    applied, _, _ = build_applied(program, model_name, seed=0)
    model = applied.model
    _set_bias(model)
    topology = Topology.of(applied)
    ids, labels = _batch()
    rows = ROWS // topology.dp_size
    mine = slice(topology.dp_rank * rows, (topology.dp_rank + 1) * rows)
    out = _forward(model, ids[mine])
    total = int((labels != -100).sum())
    loss, ce, aux = _loss(model, out, labels[mine], total, topology.loss_group, topology.grad_divisor)
    loss.backward()
    logits = out.logits.full_tensor() if hasattr(out.logits, "full_tensor") else out.logits
    ce_all = ce.clone()
    if topology.loss_group is not None:
        torch.distributed.all_reduce(ce_all, group=topology.loss_group)
    expected = ref["logits"][mine]
    return {
        "logits": float((logits.detach() - expected).norm() / expected.norm()),
        "ce": abs(float(ce_all) - ref["ce"]) / ref["ce"],
        "aux": abs(float(aux) - ref["aux"]) / max(ref["aux"], 1e-30),
        "grads": _compare_grads(model, program, ref["ref"]),
    }


def _program(model: str, layout: str, dispatch: str = "alltoall") -> Any:
    from meshplan.planner.compile import compile

    return compile(plan_text(model, layout, dispatch), model, 4)


def _check(pool: RankPool, model: str, layout: str, dispatch: str = "alltoall") -> None:
    program = _program(model, layout, dispatch)
    ref = reference(model)
    reports = pool.run(rank_case, program.to_json(), model, ref, timeout=240.0)
    for rank, rep in enumerate(reports):
        for what in ("logits", "ce", "aux"):
            assert rep[what] <= TOL, f"rank {rank}: {what} relative error {rep[what]:.2g}"
        assert rep["grads"][0] <= TOL, f"rank {rank}: {rep['grads'][1]}"


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("model", sorted(ARCH))
@pytest.mark.parametrize("layout", sorted(MESHES))
def test_expert_parallel_equals_one_process(pool: RankPool, model: str, layout: str) -> None:
    _check(pool, model, layout)


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_allgather_dispatch_equals_one_process(pool: RankPool, model: str) -> None:
    _check(pool, model, "ep2_tp2" if model == "tiny-mixtral" else "ep2", "allgather")


def test_the_step_records_the_expert_mesh() -> None:
    """ep 2 with tp 2: the tokens are replicated over tp, and the experts' FSDP group (the
    other ep group) divides by the dense parameters' 2 data-parallel ranks."""
    program = _program("tiny-mixtral", "ep2_tp2")
    (step,) = [s for s in program.steps if s.kind == "expert_parallel"]
    assert step.fqns == ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
    assert (step.size, step.replicas, step.fsdp, step.gradient_divide_factor) == (2, ("tp",), True, 2)
    kinds = [s.kind for s in program.steps]
    assert kinds.index("expert_parallel") < kinds.index("fully_shard")
    assert kinds.index("parallelize") < kinds.index("expert_parallel")


# ------------------------------------------------- the training step's balancing loss


def _with_balancing(model: torch.nn.Module) -> torch.nn.Module:
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = AUX_COEF
    return model


@functools.cache
def step_reference(model_name: str, context: Any = None, dp: int = 4) -> Any:
    """One process, the bins the `dp` data-parallel ranks train on (one each, cut for the
    context-parallel split when there is one): CE over their tokens plus the balancing
    loss over all of them (the global micro-batch), one backward."""
    from meshplan.runtime import build_model, prepare
    from meshplan.runtime.attention import forward_kwargs
    from meshplan.runtime.parallel.experts import load_balancing_loss
    from meshplan.runtime.train.loss import loss_sum_and_count
    from meshplan.runtime.weights.loading import canonical_name
    from tests.truth import FLOOR, SEQ_LEN, Reference, _data

    torch.set_num_threads(1)
    model = _with_balancing(build_model(model_name, seed=0))
    prepare(model)
    model.train()
    data = _data(model_name, SEQ_LEN, context)
    bins = [next(iter(data.loader(r, dp, micro_batch=1)))[0] for r in range(dp)]
    targets = sum(int((b["labels"] != -100).sum()) for b in bins)
    ce = torch.zeros(())
    router: list[torch.Tensor] = []
    for b in bins:
        out = model(**forward_kwargs(b), output_router_logits=True)
        ce = ce + loss_sum_and_count(out.logits, b["labels"])[0]
        router += list(out.router_logits)
    config = model.config
    aux = load_balancing_loss(router, config.num_experts, config.num_experts_per_tok)
    (ce / targets + AUX_COEF * aux).backward()
    grads = {canonical_name(n): p.grad.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)
             if p.grad is not None}
    rms = (sum(float(g.norm()) ** 2 for g in grads.values()) / len(grads)) ** 0.5
    return Reference(float(ce) / targets, 0.0, grads, FLOOR * rms)


def step_case(program_json: str, model_name: str, ref: Any) -> tuple[float, float, tuple[float, str]]:
    from meshplan.planner.program import Program
    from meshplan.runtime import Topology, build_applied
    from tests.truth import BINS, SEQ_LEN, _compare_grads, _data, _step

    program = Program.from_json(program_json)
    applied, _, _ = build_applied(program, model_name, seed=0)
    _with_balancing(applied.model)
    topology = Topology.of(applied)
    loader = _data(model_name, SEQ_LEN, None).loader(topology.dp_rank, topology.dp_size,
                                                     micro_batch=BINS // topology.dp_size)
    loss, norm = _step(applied.model, next(iter(loader)), topology)
    return loss, norm, _compare_grads(applied.model, program, ref)


def test_training_step_adds_the_global_balancing_loss(pool: RankPool) -> None:
    """`train_step` (what `plan run` runs) adds `router_aux_loss_coef` × the balancing loss
    over the global micro-batch when the config asks for router logits: with ep 2 over
    dp_shard 4 (one bin per rank) every gradient equals one process's on the 4 bins, and
    differs from a step without it (the router's gradient changes)."""
    ref = step_reference("tiny-qwen3-moe")
    program = _program("tiny-qwen3-moe", "ep2")
    for rank, (loss, _, worst) in enumerate(pool.run(step_case, program.to_json(), "tiny-qwen3-moe", ref)):
        assert worst[0] <= TOL, f"rank {rank}: {worst[1]}"
        assert abs(loss - ref.loss) <= TOL * ref.loss, rank
    plain = reference_without_balancing("tiny-qwen3-moe")
    gate = "model.layers.0.mlp.gate.weight"
    assert float((plain[gate] - ref.grads[gate]).norm()) > 1e-3 * float(ref.grads[gate].norm())


def reference_without_balancing(model_name: str) -> dict[str, torch.Tensor]:
    from meshplan.runtime import Topology, build_model, prepare
    from tests.truth import BINS, SEQ_LEN, _data, _step

    model = build_model(model_name, seed=0)
    prepare(model)
    _step(model, next(iter(_data(model_name, SEQ_LEN, None).loader(0, 1, micro_batch=BINS))), Topology())
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------ with context parallelism


CP_PLAN = """plan moe_cp for {arch}
mesh {{
  dp_shard = 2
  cp = 2
  ep = 2
}}
submesh fsdp = dp_shard * cp
fully_shard on fsdp {{
  unit model.layers.*
  root
}}
context_parallel on cp {{
  attention model.layers.*.self_attn
  load_balance = {balance}
}}
expert_parallel on ep {{
  experts model.layers.*.mlp.experts
  dispatch = alltoall
}}
"""


def cp_step_case(program_json: str, model_name: str, ref: Any) -> tuple[float, float, tuple[float, str]]:
    """`train_step` on this rank's part of its data-parallel rank's bin (the loader cuts
    it for its cp rank), the balancing loss over dp × cp."""
    from meshplan.planner.program import Program
    from meshplan.runtime import Topology, build_applied
    from tests.truth import SEQ_LEN, _compare_grads, _data, _step

    program = Program.from_json(program_json)
    applied, _, _ = build_applied(program, model_name, seed=0)
    _with_balancing(applied.model)
    topology = Topology.of(applied)
    assert topology.loss_size == 4, topology  # dp 2 × cp 2: the tokens of one global batch
    loader = _data(model_name, SEQ_LEN, topology.context).loader(
        topology.dp_rank, topology.dp_size, micro_batch=1, cp_rank=topology.cp_rank)
    loss, norm = _step(applied.model, next(iter(loader)), topology)
    return loss, norm, _compare_grads(applied.model, program, ref)


@pytest.mark.parametrize(("model", "balance"), [("tiny-qwen3-moe", "headtail"), ("tiny-mixtral", "none")])
def test_expert_parallel_with_context_parallel(pool: RankPool, model: str, balance: str) -> None:
    """cp 2 × ep 2 (dp_shard 2): the ep group is the cp group, whose ranks hold different
    parts of the same sequences; the balancing loss sums tokens per expert and router
    probabilities over dp × cp. Loss and every gradient equal one process's on every rank."""
    from meshplan.planner.compile import compile
    from meshplan.runtime.parallel.apply import context_split

    program = compile(CP_PLAN.format(arch=ARCH[model], balance=balance), model, 4)
    ref = step_reference(model, context_split(program), dp=2)
    for rank, (loss, _, worst) in enumerate(pool.run(cp_step_case, program.to_json(), model, ref)):
        assert abs(loss - ref.loss) <= TOL * ref.loss, f"rank {rank}: loss {loss}, one process {ref.loss}"
        assert worst[0] <= TOL, f"rank {rank}: {worst[1]}"
