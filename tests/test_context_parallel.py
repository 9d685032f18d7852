"""Context parallelism on 4 gloo ranks equals one process (cp 1).

Each case builds the same model (seed 0) on every rank and, next to it, the cp 1
reference on that rank; every data-parallel rank takes its own full-row batch (packed
or padded), its context-parallel peers cut it with `applied.shard_batch`, and the test
compares, within 1e-5 relative in fp32:

- logits: each rank's local logits with the reference's at the rank's row positions;
- loss: the token-weighted mean over the loss group with the reference's over all the
  data-parallel ranks' batches;
- gradients: every parameter's full gradient (after FSDP's reduce-scatter) with the
  reference's.

Layouts (4 ranks): cp 2 (× dp_replicate 2, HSDP), cp 4, cp 2 × tp 2 (sequence
parallel, loss parallel), cp 2 × FSDP 2 (dp_shard 2), all-gather and ring rotation;
formats varlen, thd, segment_ids (packed) and padded; Llama (GQA), Qwen2 (biases)
and Gemma-2 (sliding window, soft-capping). Then the loop end to end (`train` with the
packing loader's split) and the collectives `plan explain` counts.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import RankPool, rank_pool_fixture

pytestmark = pytest.mark.slow

WORLD = 4
SEQ_LEN = 32
PLANS = Path(__file__).resolve().parent.parent / "plans"
RTOL = 1e-5

pool = rank_pool_fixture(WORLD, timeout=300.0)

# name → overrides of plans/llama.plan (fp32: its mixed_precision line is removed)
LAYOUTS: dict[str, tuple[str, ...]] = {
    "cp2-hsdp": ("tp=1", "mesh.cp=2", "mesh.dp_replicate=2"),
    "cp4": ("tp=1", "mesh.cp=4"),
    "cp2-tp2": ("tp=2", "mesh.cp=2"),
    "cp2-fsdp2": ("tp=1", "mesh.cp=2"),
}

GEMMA_PLAN = """\
plan gemma_cp for Gemma2ForCausalLM
mesh {
  dp_shard = auto
  cp = 2
}
submesh fsdp = dp_shard * cp
fully_shard on fsdp {
  unit model.layers.*
  root
}
context_parallel on cp {
  attention model.layers.*.self_attn
  load_balance = headtail
  rotate = ROTATE
}
packing {
  seq_len = 32
}
"""


def _llama_text(rotate: str) -> str:
    text = (PLANS / "llama.plan").read_text(encoding="utf-8")
    text = re.sub(r"^\s*mixed_precision\s*\{[^}]*\}.*$", "", text, flags=re.M)
    return text.replace("load_balance = headtail", f"load_balance = headtail\n  rotate = {rotate}")


@functools.cache
def _program_json(model: str, layout: str, rotate: str) -> str:
    from meshplan.planner.compile import compile_plan

    if model == "tiny-gemma2":
        text, overrides = GEMMA_PLAN.replace("ROTATE", rotate), []
    else:
        text, overrides = _llama_text(rotate), [*LAYOUTS[layout], f"seq_len={SEQ_LEN}"]
    program = compile_plan(text, model, WORLD, overrides).program
    assert any(s.kind == "context_parallel" for s in program.steps)
    return program.to_json()


# --------------------------------------------------------------------------- rank side


def _batches(fmt: str, cp: int, count: int) -> list[dict[str, Any]]:
    """`count` full-row batches (one per data-parallel rank), the same on every rank."""
    from meshplan.runtime.packing import collate

    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        lengths = [int(n) for n in torch.randint(3, 9, (3,), generator=g)]
        seqs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
        size = {"max_len": SEQ_LEN // 2} if fmt == "padded" else {"seq_len": SEQ_LEN}
        out.append(collate(seqs, fmt, cp_size=cp, **size))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def equivalence_case(model_name: str, program_json: str, fmt: str) -> dict[str, float]:
    """Largest relative differences to cp 1 on this rank: logits, loss, gradients."""
    import torch.distributed as dist

    from meshplan.planner.program import Program
    from meshplan.runtime.attention import forward_kwargs
    from meshplan.runtime.train.build import build_applied, build_model, prepare
    from meshplan.runtime.train.loss import loss_sum_and_count, vocab_parallel
    from meshplan.runtime.train.topology import Topology

    applied, _, _ = build_applied(Program.from_json(program_json), model_name, seed=0)
    topology = Topology.of(applied)
    assert topology.context is not None
    batches = _batches(fmt, topology.context.size, topology.dp_size)

    reference = build_model(model_name, seed=0)
    prepare(reference)
    ref_sum = torch.zeros(())
    ref_count = 0
    ref_logits = []
    for batch in batches:
        logits = reference(**forward_kwargs(batch)).logits
        total, count = loss_sum_and_count(logits, batch["labels"])
        ref_sum = ref_sum + total
        ref_count += int(count)
        ref_logits.append(logits.detach())
    (ref_sum / ref_count).backward()

    local = applied.shard_batch(batches[topology.dp_rank])
    counts = torch.tensor([float((local["labels"] != -100).sum())], dtype=torch.float64)
    dist.all_reduce(counts, group=topology.loss_group)
    assert int(counts) == ref_count
    with vocab_parallel() if topology.vocab_parallel else contextlib.nullcontext():
        logits = applied.model(**forward_kwargs(local)).logits
        total, _ = loss_sum_and_count(logits, local["labels"])
        (total * topology.grad_divisor / ref_count).backward()
    loss = total.detach().double().reshape(1)
    dist.all_reduce(loss, group=topology.loss_group)

    expected = ref_logits[topology.dp_rank][:, local["cp_query_index"]]
    result = {"logits": _relative(_full(logits), expected),
              "loss": abs(float(loss) / ref_count - float(ref_sum) / ref_count) / (float(ref_sum) / ref_count)}
    ref_grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in reference.named_parameters()}
    worst = 0.0
    for name, p in applied.model.named_parameters():
        ref = ref_grads[name.replace("_checkpoint_wrapped_module.", "")]
        assert p.grad is not None and ref is not None, name
        worst = max(worst, _relative(_full(p.grad), ref))
    result["grads"] = worst
    return result


def unsplit_case(program_json: str) -> str:
    """Calling a context-parallel model with a full-row batch fails, naming the fix."""
    from meshplan.planner.program import Program
    from meshplan.runtime.attention import forward_kwargs
    from meshplan.runtime.train.build import build_applied

    applied, _, _ = build_applied(Program.from_json(program_json), "tiny-llama", seed=0)
    batch = _batches("varlen", 2, 1)[0]
    try:
        applied.model(**forward_kwargs(batch))
    except RuntimeError as e:
        return str(e)
    return "no error"


def train_case(model_name: str, program_json: str | None, fmt: str) -> dict[str, Any] | None:
    """3 steps of `runtime.train` on the packing loader (the single process when
    program_json is None, with the whole global batch as micro-batches)."""
    import torch.distributed as dist

    from meshplan.planner.program import Program
    from meshplan.runtime.parallel.context import ContextSplit
    from meshplan.runtime.train.build import build_applied, build_model, prepare
    from meshplan.runtime.train.data import PackedData, synthetic_sequences
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, train
    from meshplan.runtime.train.topology import Topology

    config = TrainConfig(steps=3, lr=1e-3, max_grad_norm=0.5)
    sequences = synthetic_sequences(48, 256, min_len=3, max_len=SEQ_LEN // 2, seed=3)
    if program_json is None:
        model = build_model(model_name, seed=0)
        prepare(model)
        target: Any = model
        topology = Topology()
        context, micro, cp_rank = ContextSplit(2), 2, None
    else:
        applied, _, _ = build_applied(Program.from_json(program_json), model_name, seed=0)
        model, target, topology = applied.model, applied, Topology.of(applied)
        context, micro, cp_rank = topology.context, 1, topology.cp_rank
    data = PackedData.build(sequences, SEQ_LEN, format=fmt, context=context)
    loader = data.loader(topology.dp_rank, topology.dp_size, micro_batch=micro, cp_rank=cp_rank)
    history = train(target, make_optimizer(model, config), loader, topology, config)
    params = {n.replace("_checkpoint_wrapped_module.", ""): _full(p).clone() for n, p in model.named_parameters()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {"loss": [h.loss for h in history], "norm": [h.grad_norm for h in history],
            "tokens": [h.tokens for h in history], "targets": [h.targets for h in history], "params": params}


# --------------------------------------------------------------------------- pytest side


def _check(results: list[dict[str, float]]) -> None:
    for rank, got in enumerate(results):
        for what, value in got.items():
            assert value <= RTOL, f"rank {rank}: {what} differs from cp 1 by {value:.2e} (relative)"


@pytest.mark.parametrize("fmt", ["varlen", "padded"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llama_matches_cp1(pool: RankPool, layout: str, fmt: str) -> None:
    _check(pool.run(equivalence_case, "tiny-llama", _program_json("tiny-llama", layout, "allgather"), fmt))


@pytest.mark.parametrize("layout", ["cp4", "cp2-tp2"])
@pytest.mark.parametrize("fmt", ["varlen", "padded"])
def test_ring_matches_cp1(pool: RankPool, layout: str, fmt: str) -> None:
    _check(pool.run(equivalence_case, "tiny-llama", _program_json("tiny-llama", layout, "ring"), fmt))


@pytest.mark.parametrize("fmt", ["thd", "segment_ids"])
def test_packed_formats_match_cp1(pool: RankPool, fmt: str) -> None:
    _check(pool.run(equivalence_case, "tiny-llama", _program_json("tiny-llama", "cp2-fsdp2", "allgather"), fmt))


def test_qwen2_biases_match_cp1(pool: RankPool) -> None:
    _check(pool.run(equivalence_case, "tiny-qwen2", _program_json("tiny-qwen2", "cp2-fsdp2", "allgather"),
                    "varlen"))


@pytest.mark.parametrize("rotate", ["allgather", "ring"])
def test_gemma2_window_and_softcap_match_cp1(pool: RankPool, rotate: str) -> None:
    # tiny-gemma2 alternates sliding (window 8) and global layers: with 32-token rows a
    # window crosses chunk and rank boundaries.
    _check(pool.run(equivalence_case, "tiny-gemma2", _program_json("tiny-gemma2", "", rotate), "varlen"))


def test_an_unsplit_batch_is_refused(pool: RankPool) -> None:
    messages = pool.run(unsplit_case, _program_json("tiny-llama", "cp2-fsdp2", "allgather"))
    for message in messages:
        assert "model.layers.0.self_attn" in message
        assert "applied.shard_batch" in message


@pytest.mark.parametrize("fmt", ["varlen", "padded"])
def test_training_loop_matches_single_process(pool: RankPool, fmt: str) -> None:
    # cp 2 × FSDP 2: the packing loader pads every sequence to 2·cp and cuts each bin for
    # the rank's cp coordinate; the loop reduces the loss over the loss submesh.
    got = pool.run(train_case, "tiny-llama", _program_json("tiny-llama", "cp2-fsdp2", "allgather"), fmt)[0]
    ref = train_case("tiny-llama", None, fmt)
    assert got is not None and ref is not None
    assert got["targets"] == ref["targets"] and got["tokens"] == ref["tokens"]
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(got["norm"]), torch.tensor(ref["norm"]), rtol=RTOL, atol=0)
    names = list(ref["params"])
    flat = [torch.cat([d[n].flatten() for n in names]) for d in (got["params"], ref["params"])]
    assert _relative(*flat) <= RTOL
