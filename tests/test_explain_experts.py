"""`plan explain`'s expert-parallel figures against a real 4-rank gloo run of the same Program.

Each rank builds the tiny MoE model on CPU, applies the Program with the runtime, and
runs one forward and backward on its own batch with a routing the test controls (a
forward pre-hook on every `mlp.experts` replaces the router's top-k experts), then one
AdamW step. Measured there, per rank:

- the bytes of the rank's expert shards (`gate_up_proj`, `down_proj` under the experts'
  own FSDP unit over efsdp), their gradients and AdamW states: the distinct storages —
  must equal `ExpertFigures.memory` exactly;
- every all-to-all the experts issue (counts, rows, results, both ways, the recomputed
  forward of a checkpointed layer, the token replicas' gathers), seen by a dispatch mode
  below autograd: the tensor handed to the collective, what of it goes to other ranks
  (its input splits) and what comes from them (its output splits) — must equal the
  explained totals exactly: under balanced routing (every expert gets tokens·k / E of
  every rank's assignments) on every rank, and with every token of the ep group routed
  to the experts of ep rank 0 (the worst case) on the ranks that receive them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from meshplan.planner import compile_plan
from meshplan.runtime.explain.report import explain
from tests.distributed import rank_pool_fixture
from tests.test_explain_real import _storage_bytes

pytestmark = pytest.mark.slow

WORLD = 4
SEQ, MICRO = 32, 2  # 64 tokens per rank

pool = rank_pool_fixture(WORLD, timeout=300.0)

ARCH = {"tiny-mixtral": "MixtralForCausalLM", "tiny-qwen3-moe": "Qwen3MoeForCausalLM"}
TP = {"tiny-mixtral": "tensor_parallel on tp {\n  model.layers.*.self_attn.{q,k,v}_proj : colwise\n"
                      "  model.layers.*.self_attn.o_proj : rowwise\n}\n"}


def plan_text(model: str, mesh: str, dispatch: str, checkpoint: bool) -> str:
    ac = "activation_checkpoint model.layers.* { mode = full }\n" if checkpoint else ""
    tp = TP.get(model, "") if "tp" in mesh else ""
    return (f"plan moe for {ARCH[model]}\nmesh {{\n  {mesh}\n}}\n{tp}{ac}"
            # bf16 compute: the dry run's fake grouped_mm takes bf16 only
            "fully_shard on dp_shard {\n  mixed_precision { param = bf16, reduce = fp32 }\n"
            "  unit model.layers.*\n  root\n}\n"
            f"expert_parallel on ep {{\n  experts model.layers.*.mlp.experts\n  dispatch = {dispatch}\n}}\n")


# (model, mesh, dispatch, checkpointed)
CASES = {
    "qwen3-ep2-alltoall-ac": ("tiny-qwen3-moe", "dp_shard = 4\n  ep = 2", "alltoall", True),
    "qwen3-ep4-alltoall": ("tiny-qwen3-moe", "dp_shard = 4\n  ep = 4", "alltoall", False),
    "mixtral-ep2-tp2-alltoall": ("tiny-mixtral", "dp_shard = 2\n  tp = 2\n  ep = 2", "alltoall", False),
    "mixtral-ep2-allgather": ("tiny-mixtral", "dp_shard = 4\n  ep = 2", "allgather", False),
}


# ----------------------------------------------------------------------------- the ranks


def _recorder() -> Any:
    """Every all-to-all below autograd (gloo's and the functional one): (input bytes,
    bytes to other ranks, bytes from other ranks)."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    def traffic(inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any,
                out_rows: int) -> tuple[int, int, int]:
        n, me = group.size(), dist.get_rank(group)
        row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        ins = list(in_splits) or [inp.shape[0] // n] * n
        outs = list(out_splits) or [out_rows // n] * n
        return (inp.numel() * inp.element_size(), sum(r for j, r in enumerate(ins) if j != me) * row,
                sum(r for j, r in enumerate(outs) if j != me) * row)

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int, int, int]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            name = func._overloadpacket.__name__
            namespace = func.namespace
            if namespace == "_c10d_functional" and name == "all_to_all_single":
                inp, out_splits, in_splits, group_name = args[:4]
                group = dist.distributed_c10d._resolve_process_group(group_name)
                self.calls.append(traffic(inp, out_splits, in_splits, group, sum(out_splits)))
            elif namespace == "c10d" and name == "alltoall_base_":
                output, inp, boxed, out_splits, in_splits = args[:5]
                self.calls.append(traffic(inp, out_splits, in_splits, dist.ProcessGroup.unbox(boxed),
                                          output.shape[0]))
            return func(*args, **kwargs)

    return Recorder()


def _route(routing: str) -> Any:
    """A forward pre-hook on the experts: token t's j-th expert is (t·k + j) mod E
    (balanced: every expert gets tokens·k / E), or mod E/ep (every token to the experts of
    ep rank 0)."""
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden, index, weights = args
        tokens, k = index.shape
        experts = int(module.num_experts)
        span = experts if routing == "balanced" else experts // module.ep_size
        chosen = (torch.arange(tokens).unsqueeze(1) * k + torch.arange(k)) % span
        return hidden, chosen.to(index.dtype), weights

    return hook


def rank_case(program_json: str, model_name: str, routing: str) -> dict[str, Any]:
    import copy

    from meshplan.planner.models import resolve_model
    from meshplan.planner.program import ExpertParallel, Program
    from meshplan.runtime.attention import use_backend
    from meshplan.runtime.parallel.apply import apply
    from meshplan.runtime.train.loss import causal_lm_loss

    program = Program.from_json(program_json)
    (step,) = program.steps_of(ExpertParallel)
    source = resolve_model(model_name)
    config = copy.deepcopy(source.config)
    config.use_cache = False
    torch.manual_seed(0)
    assert source.model_class is not None
    model = source.model_class(config)
    use_backend(model, "meshplan_sdpa")
    apply(program, model)
    experts = [model.get_submodule(f) for f in step.fqns]
    for module in experts:
        module.ep_size = step.size
        module.register_forward_pre_hook(_route(routing))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(1))
    recorder = _recorder()
    with recorder:
        logits = model(input_ids=ids, position_ids=torch.arange(SEQ).expand(MICRO, SEQ)).logits
        causal_lm_loss(logits, ids).backward()
    params = [getattr(m, name) for m in experts for name in ("gate_up_proj", "down_proj")]
    grads = _storage_bytes(p.grad for p in params)
    optimizer.step()
    states = [v for p in params for k, v in optimizer.state[p].items() if k != "step"]
    calls = recorder.calls
    return {"parameters": _storage_bytes(params), "gradients": grads, "optimizer": _storage_bytes(states),
            "calls": len(calls), "bytes": sum(c[0] for c in calls), "sent": sum(c[1] for c in calls),
            "received": sum(c[2] for c in calls)}


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_figures_match_a_real_run(pool: Any, case: str) -> None:
    model, mesh, dispatch, checkpoint = CASES[case]
    compiled = compile_plan(plan_text(model, mesh, dispatch, checkpoint), model, WORLD)
    ex = explain(compiled, seq_len=SEQ, micro_batch=MICRO)
    assert ex.experts is not None and ex.experts.tokens == SEQ * MICRO
    routings = ("balanced",) if dispatch == "allgather" else ("balanced", "worst")
    for routing in routings:
        for rank, real in enumerate(pool.run(rank_case, compiled.program.to_json(), model, routing)):
            figures = ex.experts_of(rank)
            assert figures is not None
            memory = figures.memory
            assert (real["parameters"], real["gradients"], real["optimizer"]) == \
                (memory.parameters, memory.gradients, memory.optimizer), f"rank {rank}"
            if routing == "worst" and rank % figures.ep:
                continue  # the worst case is the figures of the rank that gets every token
            total = figures.total(routing)
            calls = sum(x.per_step for x in figures.exchanges)
            assert (real["calls"], real["bytes"], real["sent"], real["received"]) == \
                (calls, total.bytes, total.sent, total.received), f"{routing}, rank {rank}"


def test_the_report_shows_the_experts() -> None:
    """The communication table carries the balanced exchanges (`ep`) and the experts' FSDP
    unit over efsdp; the JSON, the text and `--rank` show the figures."""
    from meshplan.cli.explain import _expert_lines

    model, mesh, dispatch, checkpoint = CASES["mixtral-ep2-tp2-alltoall"]
    compiled = compile_plan(plan_text(model, mesh, dispatch, checkpoint), model, WORLD)
    ex = explain(compiled, seq_len=SEQ, micro_batch=MICRO)
    figures = ex.experts
    assert figures is not None and (figures.ep, figures.efsdp, figures.replicas, figures.routed) == (2, 2, 2, 32)
    rows = {(r.dim, r.kind, r.op): r for r in ex.comm}
    balanced = figures.total("balanced")
    assert sum(r.bytes for (dim, kind, op), r in rows.items() if kind == "ep") == balanced.bytes
    assert ("efsdp", "fsdp", "all_gather") in rows and ("efsdp", "fsdp", "reduce_scatter") in rows
    # The experts' units gather the rank's 2 experts of 4 (2·128 × 64 and 64 × 128 each) in
    # bf16, in forward and again in backward, in 2 layers; the dense units no longer do.
    gate_up, down = 2 * 2 * 128 * 64, 2 * 64 * 128
    assert rows[("efsdp", "fsdp", "all_gather")].bytes == 2 * 2 * (gate_up + down) * 2  # bf16
    data = ex.to_json()["experts"]
    assert data["balanced"]["bytes"] == balanced.bytes and data["worst"]["bytes"] == figures.total("worst").bytes
    text = "\n".join(_expert_lines(ex, figures))
    assert "2 of 4 experts" in text and "worst" in text


def test_deepseek_v3_at_512_ranks() -> None:
    """The shipped DeepSeek-V3 plan explains at 512 ranks: the reduced model keeps a dense
    and a MoE layer (its first three dense layers counted in the kept ones' positions),
    FSDP units inside checkpointed blocks apply one step at a time, and the classes of
    ranks — its 32 experts per rank over an efsdp of 64 leave half the ranks none —
    cover the 512 ranks once."""
    from meshplan.planner.models import reduced_config, resolve_model

    from .conftest import ROOT

    assert reduced_config(resolve_model("deepseek-v3").config, [0, 3]).first_k_dense_replace == 1
    compiled = compile_plan((ROOT / "plans" / "deepseek_v3.plan").read_text(encoding="utf-8"), "deepseek-v3", 512)
    ex = explain(compiled, seq_len=4096, trace=False)
    assert ex.reduction.kept == (0, 3)
    assert sum(c.count for c in ex.classes) == 512
    figures = ex.experts
    assert figures is not None and (figures.local_experts, figures.layers, figures.efsdp) == (32, 58, 64)
    shapes = {c.shards["model.layers.3.mlp.experts.gate_up_proj"].local_shape[0] for c in ex.classes}
    assert shapes == {0, 1}
