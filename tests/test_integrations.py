"""Your own loop over an applied model: `runtime.train.integrations` on 4 gloo ranks
(tp 2 × dp 2, sequence parallel, vocabulary-parallel logits) gives the losses of
`plan run` itself, and the plain-batch path agrees with a single process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from meshplan.planner import compile_plan
from meshplan.planner.program import Program
from meshplan.runtime.train.build import build_applied, build_model
from meshplan.runtime.train.data import PackedData, load_sequences
from meshplan.runtime.train.integrations import (
    forward_arguments,
    global_loss,
    global_target_count,
    rank_loader,
    token_loss,
)
from meshplan.runtime.train.loop import clip_grad_norm, grad_norm
from meshplan.runtime.train.topology import Topology
from tests.distributed import RankPool, rank_pool_fixture

from .conftest import ROOT

pytestmark = pytest.mark.slow

PLAN = ROOT / "plans" / "llama.plan"
SEQ_LEN = 64
STEPS = 3

pool = rank_pool_fixture(4, timeout=300.0)


@pytest.fixture(scope="module")
def program() -> Program:
    return compile_plan(PLAN, "tiny-llama", 4, ["tp=2", f"seq_len={SEQ_LEN}"]).program


def own_loop(program: Program, steps: int) -> list[float]:
    """The README's loop: what `plan run` does, written with the public helpers."""
    built = build_applied(program, "tiny-llama", seed=0)
    model, topology = built.applied.model, Topology.of(built.applied)
    vocab = model.config.vocab_size
    data = PackedData.build(load_sequences("synthetic", vocab_size=vocab, seq_len=SEQ_LEN, seed=0),
                            SEQ_LEN, algorithm="ffd", format="varlen", context=topology.context)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _, micro in zip(range(steps), rank_loader(data, topology, seed=0), strict=False):
        count = global_target_count(micro, topology)  # before the forward: the global batch's targets
        totals = []
        for batch in micro:
            logits = model(**forward_arguments(batch)).logits
            total, _ = token_loss(logits, batch["labels"])
            (total * topology.grad_divisor / count).backward()
            totals.append(total)
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(global_loss(totals, count, topology))
    return losses


def plan_run_and_own_loop(program: Program, metrics: str) -> dict[str, Any]:
    from meshplan.cli.main import main

    code = main(["run", str(PLAN), "--model", "tiny-llama", "--set", "tp=2", "--seq-len", str(SEQ_LEN),
                 "--steps", str(STEPS), "--metrics", metrics])
    dist.barrier()
    return {"code": code, "own": own_loop(program, STEPS)}


def test_own_loop_matches_plan_run(pool: RankPool, program: Program, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    results = pool.run(plan_run_and_own_loop, program, str(metrics))
    reference = [json.loads(line)["loss"] for line in metrics.read_text("utf-8").splitlines()]
    assert len(reference) == STEPS and all(r["code"] == 0 for r in results)
    for r in results:  # every rank logs the same global loss
        assert r["own"] == pytest.approx(reference, rel=1e-5, abs=0), (r["own"], reference)
    assert reference[-1] < reference[0]


def _local_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for p in model.parameters() if p.grad is not None]


def plain_batch_case(program: Program, ids: torch.Tensor) -> dict[str, Any]:
    """A plain `{"input_ids"}` batch with unshifted labels, as a user would write it;
    the gradients against those of `plan run`'s loss (`loss_parallel()` around forward
    and backward) on the same model."""
    from meshplan.runtime.train.loss import loss_sum_and_count, vocab_parallel

    model = build_applied(program, "tiny-llama", seed=3).applied.model
    logits = model(**forward_arguments({"input_ids": ids})).logits
    total, count = token_loss(logits, ids, shift=True)
    (total / count).backward()
    mine, norm = _local_grads(model), float(grad_norm(model.parameters()))
    model.zero_grad(set_to_none=True)
    labels = torch.nn.functional.pad(ids[..., 1:], (0, 1), value=-100)
    with vocab_parallel():
        reference, ref_count = loss_sum_and_count(model(**forward_arguments({"input_ids": ids})).logits, labels)
        (reference / ref_count).backward()
    theirs = _local_grads(model)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(mine, theirs, strict=True))
    return {"loss": float(total / count), "reference": float(reference / ref_count), "grad_norm": norm,
            "worst": worst, "grads": len(mine)}


def test_plain_batches_match_plan_runs_loss_and_a_single_process(pool: RankPool, program: Program) -> None:
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    single = build_model("tiny-llama", seed=3)
    total, count = token_loss(single(input_ids=ids).logits, ids, shift=True)
    (total / count).backward()
    single_loss = float((total / count).detach())
    single_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in single.parameters()))
    # transformers' own loss on the same batch: the shifted token loss is that loss.
    assert single_loss == pytest.approx(float(single(input_ids=ids, labels=ids).loss.detach()), rel=1e-6)
    for r in pool.run(plain_batch_case, program, ids):
        assert r["grads"] > 0
        assert r["loss"] == pytest.approx(r["reference"], rel=1e-6)
        # loss_parallel's gradients, shard by shard, up to the bf16 rounding of the logits'
        # gradient (the plan computes in bf16): the fp32 losses are equal.
        assert r["worst"] < 1e-3, r
        # The plan computes in bf16 (mixed precision): a single fp32 process agrees loosely.
        assert r["loss"] == pytest.approx(single_loss, rel=1e-3)
        assert r["grad_norm"] == pytest.approx(single_norm, rel=5e-3)


# --------------------------------------------------------------------------- Hugging Face Trainer


def trainer_case(program: Program, steps: int, out: str) -> list[float]:
    """The README's `Trainer`: meshplan's model, data, loss and clipping; the Trainer's loop."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from meshplan.runtime.train.integrations import MeshplanTrainer

    built = build_applied(program, "tiny-llama", seed=0)
    model, topology = built.applied.model, Topology.of(built.applied)
    data = PackedData.build(load_sequences("synthetic", vocab_size=model.config.vocab_size, seq_len=SEQ_LEN,
                                           seed=0), SEQ_LEN, algorithm="ffd", format="varlen",
                            context=topology.context)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    args = TrainingArguments(output_dir=out, max_steps=steps, use_cpu=True, report_to=[], save_strategy="no",
                             lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
                             disable_tqdm=True)
    trainer = MeshplanTrainer(model=model, args=args, topology=topology, train_loader=rank_loader(data, topology),
                              optimizers=(optimizer, None), max_grad_norm=1.0)
    assert isinstance(trainer, Trainer) and isinstance(trainer.callback_handler.callbacks[-1], TrainerCallback)
    trainer.train()
    return trainer.global_losses


def plan_run_and_trainer(program: Program, metrics: str, out: str) -> dict[str, Any]:
    import os

    from meshplan.cli.main import main

    code = main(["run", str(PLAN), "--model", "tiny-llama", "--set", "tp=2", "--seq-len", str(SEQ_LEN),
                 "--steps", str(STEPS), "--metrics", metrics])
    dist.barrier()
    # torchrun's environment, so that accelerate sees a 4-process job (and would wrap the
    # model in DDP, were it not marked as placing itself).
    rank = dist.get_rank()
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        losses = trainer_case(program, STEPS, out)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"code": code, "trainer": losses}


def test_hf_trainer_matches_plan_run(pool: RankPool, program: Program, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    results = pool.run(plan_run_and_trainer, program, str(metrics), str(tmp_path / "trainer"))
    reference = [json.loads(line)["loss"] for line in metrics.read_text("utf-8").splitlines()]
    assert len(reference) == STEPS and all(r["code"] == 0 for r in results)
    for r in results:
        assert r["trainer"] == pytest.approx(reference, rel=1e-5, abs=0), (r["trainer"], reference)
