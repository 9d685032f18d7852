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


def plain_batch_case(program: Program, ids: torch.Tensor) -> dict[str, float]:
    """A plain `{"input_ids", "labels"}` batch, unshifted labels, as a user would write it."""
    built = build_applied(program, "tiny-llama", seed=3)
    model = built.applied.model
    logits = model(**forward_arguments({"input_ids": ids})).logits
    total, count = token_loss(logits, ids, shift=True)
    (total / count).backward()
    return {"loss": float(total / count), "grad_norm": float(grad_norm(model.parameters()))}


def test_plain_batches_match_a_single_process(pool: RankPool, program: Program) -> None:
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    reference = build_model("tiny-llama", seed=3)
    logits = reference(input_ids=ids).logits
    total, count = token_loss(logits, ids, shift=True)
    (total / count).backward()
    expected_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in reference.parameters()))
    # transformers' own loss on the same batch: the shifted token loss is that loss.
    assert float(total / count) == pytest.approx(float(reference(input_ids=ids, labels=ids).loss), rel=1e-6)
    for r in pool.run(plain_batch_case, program, ids):
        assert r["loss"] == pytest.approx(float(total / count), rel=1e-5)
        assert r["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)


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
    from meshplan.cli.main import main

    code = main(["run", str(PLAN), "--model", "tiny-llama", "--set", "tp=2", "--seq-len", str(SEQ_LEN),
                 "--steps", str(STEPS), "--metrics", metrics])
    dist.barrier()
    return {"code": code, "trainer": trainer_case(program, STEPS, out)}


def test_hf_trainer_matches_plan_run(pool: RankPool, program: Program, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    results = pool.run(plan_run_and_trainer, program, str(metrics), str(tmp_path / "trainer"))
    reference = [json.loads(line)["loss"] for line in metrics.read_text("utf-8").splitlines()]
    assert len(reference) == STEPS and all(r["code"] == 0 for r in results)
    for r in results:
        assert r["trainer"] == pytest.approx(reference, rel=1e-5, abs=0), (r["trainer"], reference)
