"""`plan explain`'s figures against a real 4-rank gloo run of the same Program.

Each rank builds the tiny model on CPU, applies the Program with the runtime, and runs
training steps (forward with full-length position ids, vocabulary-parallel loss,
backward, AdamW). Measured there:

- parameter, gradient and optimizer-state bytes: the distinct storages each rank holds
  (FSDP2's padded shards included) — must equal the estimate exactly;
- collectives: torch's `CommDebugMode` counts them, extended to record each one's
  bytes and group size — must equal the estimate (count and bytes per collective and
  group size);
- activations: the high-water mark of the `Activation` category of torch's
  `FSDPMemTracker` over the step — the estimate must be within 25 %.

With adapters (LoRA, and QLoRA's NF4 bases: torchao tensors whose inner tensors are the
storages) on tiny-llama under FSDP 4, the parameter, gradient and optimizer bytes and the
collectives must be exact too: frozen bases have no gradient, no optimizer state and no
reduce-scatter, the adapters do.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from meshplan.planner import compile_plan
from meshplan.runtime.explain.report import explain
from tests.distributed import rank_pool_fixture

from .conftest import ROOT

pytestmark = pytest.mark.slow

WORLD = 4
SEQ, MICRO = 64, 2
CASES = [
    ("llama", "tiny-llama", ["tp=2"]),  # TP + SP + HSDP (replicate of size 1), full AC, loss parallel
    ("gpt2", "tiny-gpt2", ["tp=2"]),  # Conv1D styles, fused c_attn, tied embedding, no AC
    # Context parallel on top of TP + SP: the all-gather of K/V and its reduce-scatter.
    ("llama", "tiny-llama", ["tp=2", "mesh.cp=2"]),
    ("llama-ring", "tiny-llama", ["tp=1", "mesh.cp=4"]),  # ring attention: shifts of K/V
]

pool = rank_pool_fixture(WORLD, timeout=300.0)

_OPS = {"_allgather_base_": "all_gather", "allgather_": "all_gather", "all_gather_into_tensor": "all_gather",
        "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
        "allreduce_": "all_reduce", "all_reduce": "all_reduce", "all_to_all_single": "all_to_all"}


def _storage_bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        local = t._local_tensor if isinstance(t, DTensor) else t
        if is_traceable_wrapper_subclass(local):  # an NF4 weight: its inner tensors hold the bytes
            for name in local.__tensor_flatten__()[0]:
                add(getattr(local, name))
            return
        storage = local.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()

    for t in tensors:
        if t is not None:
            add(t)
    return sum(seen.values())


def _recorder() -> Any:
    """CommDebugMode, also recording (collective, bytes, group size) of each call."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    class Recorder(CommDebugMode):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, int, int]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            before = sum(self.comm_counts.values())
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if out is NotImplemented or sum(self.comm_counts.values()) == before:
                return out
            name = func._overloadpacket.__name__
            tensors = [t for t in _flat(args) if isinstance(t, torch.Tensor)]
            group = next((a for a in reversed(_flat(args)) if isinstance(a, str)), None)
            if group is not None:  # functional collective: (tensor, ..., group_name)
                size = dist.distributed_c10d._resolve_process_group(group).size()
                nbytes = tensors[0].numel() * tensors[0].element_size()
                if _OPS[name] == "all_gather":
                    nbytes *= size
                splits = [a for a in _flat(args)[1:] if isinstance(a, int)]
                if _OPS[name] == "all_to_all" and sum(1 for n in splits if n) == 2:
                    # One peer to send to and one to receive from: a ring shift.
                    self.calls.append(("send_recv", nbytes, size))
                    return out
            else:  # c10d op: the process group is an argument
                boxed = next(a for a in _flat(args) if isinstance(a, torch.ScriptObject)
                             and a._type().qualified_name().endswith("ProcessGroup"))
                size = dist.ProcessGroup.unbox(boxed).size()
                # all-gather: the output (first); reduce-scatter: the input (second); all-reduce: the tensor.
                index = 1 if _OPS[name] == "reduce_scatter" else 0
                nbytes = tensors[index].numel() * tensors[index].element_size()
            self.calls.append((_OPS[name], nbytes, size))
            return out

    return Recorder()


def _flat(x: Any) -> list[Any]:
    if isinstance(x, list | tuple):
        return [y for v in x for y in _flat(v)]
    return [x]


def _real_step(program_json: str, model_name: str) -> dict[str, Any]:
    import copy

    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType

    from meshplan.planner.models import resolve_model
    from meshplan.planner.program import Program
    from meshplan.runtime.parallel.apply import apply
    from meshplan.runtime.train.loss import causal_lm_loss, vocab_parallel

    class ActivationPeak(FSDPMemTracker):  # type: ignore[misc]
        peak = 0

        def _update_peak_stats(self, peak_state: Any) -> None:
            super()._update_peak_stats(peak_state)
            for snap in self._curr_mem_snap.values():
                self.peak = max(self.peak, snap.get(_FSDPRefType.ACT, 0))

    from meshplan.runtime.attention import use_backend

    program = Program.from_json(program_json)
    source = resolve_model(model_name)
    config = copy.deepcopy(source.config)
    config.use_cache = False
    torch.manual_seed(0)
    assert source.model_class is not None
    model = source.model_class(config)
    use_backend(model, "meshplan_sdpa")
    applied = apply(program, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(1))
    batch = applied.shard_batch({"input_ids": ids, "position_ids": torch.arange(SEQ).expand(MICRO, SEQ)})
    ids = batch.pop("input_ids")
    out: dict[str, Any] = {}
    # Step 1 counts collectives, step 2 tracks memory (the two trackers interfere).
    for step in (1, 2):
        tracker = _recorder() if step == 1 else ActivationPeak(model, optimizer)
        with tracker, vocab_parallel():
            logits = model(input_ids=ids, **batch).logits
            causal_lm_loss(logits, ids).backward()
        if step == 1:
            out["comm"] = tracker.calls
        else:
            out["activations"] = tracker.peak
            out["gradients"] = _storage_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    out["parameters"] = _storage_bytes(model.parameters())
    out["optimizer"] = _storage_bytes(v for state in optimizer.state.values() for k, v in state.items()
                                      if k != "step")  # step counters are host scalars
    return out


@pytest.mark.parametrize("plan,model,overrides", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_estimates_match_a_real_run(pool: Any, plan: str, model: str, overrides: list[str]) -> None:
    file, _, variant = plan.partition("-")
    text = (ROOT / "plans" / f"{file}.plan").read_text(encoding="utf-8")
    if variant == "ring":
        text = text.replace("load_balance = headtail", "load_balance = headtail\n  rotate = ring")
    compiled = compile_plan(text, model, WORLD, overrides)
    ex = explain(compiled, seq_len=SEQ, micro_batch=MICRO)
    assert [c.count for c in ex.classes] == [WORLD]  # even shards: one class
    results = pool.run(_real_step, compiled.program.to_json(), model)
    estimate = ex.memory[0]
    for rank, real in enumerate(results):
        assert (real["parameters"], real["gradients"], real["optimizer"]) == \
            (estimate.parameters, estimate.gradients, estimate.optimizer), f"rank {rank}"
        assert abs(estimate.activations - real["activations"]) <= 0.25 * real["activations"], \
            (rank, estimate.activations, real["activations"])
    _assert_collectives(ex, results[0]["comm"])


def _assert_collectives(ex: Any, calls: list[tuple[str, int, int]]) -> None:
    """Collectives of rank 0, by (collective, group size): count and bytes."""
    measured: Counter[tuple[str, int]] = Counter()
    measured_bytes: Counter[tuple[str, int]] = Counter()
    for op, nbytes, size in calls:
        measured[(op, size)] += 1
        measured_bytes[(op, size)] += nbytes
    counted: Counter[tuple[str, int]] = Counter()
    counted_bytes: Counter[tuple[str, int]] = Counter()
    for row in ex.comm:
        counted[(row.op, row.group_size)] += row.count
        counted_bytes[(row.op, row.group_size)] += row.bytes
    assert counted == measured
    assert counted_bytes == measured_bytes


# tiny-llama's projections are small: NF4 blocks of 16 values and 8 scalers per scale,
# so that every FSDP shard of 4 holds whole blocks.
_QUANTIZE = "  quantize { format = nf4, backend = torchao, compute = bf16, block_size = 16, scaler_block_size = 8 }\n"
ADAPTER_CASES = {"lora": "", "qlora": _QUANTIZE}


def adapters_plan(quantize: str = "") -> str:
    """plans/fsdp.plan (FSDP over every rank, bf16 compute, full checkpointing) with rank-4
    LoRA adapters on every projection."""
    text = (ROOT / "plans" / "fsdp.plan").read_text(encoding="utf-8")
    section = ("adapters {\n  rank = 4\n  alpha = 8\n"
               "  targets model.layers.*.self_attn.{q,k,v,o}_proj\n"
               "  targets model.layers.*.mlp.{gate,up,down}_proj\n" + quantize + "}\n\n")
    return text.replace("activation_checkpoint", section + "activation_checkpoint", 1)


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_adapter_estimates_match_a_real_run(pool: Any, case: str) -> None:
    compiled = compile_plan(adapters_plan(ADAPTER_CASES[case]), "tiny-llama", WORLD, ["seq_len=64"])
    ex = explain(compiled, seq_len=SEQ, micro_batch=MICRO)
    assert [c.count for c in ex.classes] == [WORLD]
    counts = ex.parameter_counts()
    assert counts.trainable == 2 * 4 * (3 * 64 + 64 + 2 * (64 + 32) + 3 * (64 + 128))  # layers · rank · (in + out)
    assert (counts.nf4 > 0) == (case == "qlora")
    results = pool.run(_real_step, compiled.program.to_json(), "tiny-llama")
    estimate = ex.memory[0]
    for rank, real in enumerate(results):
        assert (real["parameters"], real["gradients"], real["optimizer"]) == \
            (estimate.parameters, estimate.gradients, estimate.optimizer), f"rank {rank}"
    # The frozen bases cost no gradient: the adapters' (fp32, sharded over 4) are all there is.
    assert estimate.gradients == counts.trainable * 4 // WORLD
    assert estimate.optimizer == 2 * estimate.gradients
    # FSDP2 gathers every parameter (an NF4 base as its codes, scalers and scales) and
    # reduce-scatters only the adapters' gradients.
    _assert_collectives(ex, results[0]["comm"])
