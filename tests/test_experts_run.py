"""`plan run` with expert parallelism: 3 training steps on 4 ranks match one process.

The same tiny Mixtral, seed, data and optimizer (AdamW, clipping at norm 1) are trained
for 3 steps twice through the CLI: on 4 gloo ranks under torchrun with ep 2 over the tp
ranks of dp_shard 2 × tp 2 (tensor-parallel attention, the experts' own FSDP units), and
in one process with FSDP over a single rank. fp32 throughout (no mixed precision), so
the per-step losses and gradient norms written to `--metrics` must agree closely — the
updates of step 1 and 2 shape the losses of steps 2 and 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

EXPERT_PLAN = """\
plan moe for MixtralForCausalLM
mesh {
  dp_shard = auto
  tp = 2
  ep = 2
}
tensor_parallel on tp {
  model.layers.*.self_attn.{q,k,v}_proj : colwise
  model.layers.*.self_attn.o_proj       : rowwise
}
fully_shard on dp_shard {
  unit model.layers.*
  root
}
expert_parallel on ep {
  experts model.layers.*.mlp.experts
}
"""
ONE_PLAN = """\
plan one for MixtralForCausalLM
mesh {
  dp_shard = auto
}
fully_shard on dp_shard {
  unit model.layers.*
  root
}
"""
ARGS = ["--model", "tiny-mixtral", "--seq-len", "64", "--steps", "3", "--lr", "1e-3"]


def _run(tmp_path: Path, name: str, text: str, ranks: int) -> list[dict[str, float]]:
    plan = tmp_path / f"{name}.plan"
    plan.write_text(text, encoding="utf-8")
    metrics = tmp_path / f"{name}.jsonl"
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [])
    # The same global batch of 2 bins: one per data-parallel rank (dp_shard 2), or both
    # in one process.
    micro = "1" if ranks > 1 else "2"
    command = [sys.executable, *launcher, "-m", "meshplan.cli.main", "run", str(plan), *ARGS,
               "--micro-batch", micro, "--metrics", str(metrics)]
    # One process without torchrun: `plan run` makes a process group of one itself.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]


def test_three_steps_with_expert_parallelism_match_one_process(tmp_path: Path) -> None:
    ours = _run(tmp_path, "experts", EXPERT_PLAN, 4)
    one = _run(tmp_path, "one", ONE_PLAN, 1)
    assert [r["step"] for r in ours] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(ours, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (ours, one)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (ours, one)
