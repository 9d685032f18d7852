"""`plan run` under `torchrun --max-restarts`: a rank killed mid-run, the job restarts by
itself from the newest checkpoint and ends with the losses of an uninterrupted run, bit
for bit; resuming under another layout is a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

# Two ranks, few steps: every torchrun start (four here) costs each rank its imports and
# compile, which is most of this test's time; the restart logic is the same at any size.
STEPS = 6
EVERY = 2
RANKS = 2


def _command(checkpoints: Path, metrics: Path, *extra: str, restarts: int = 0, tp: int = 2,
             steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
            "--max-restarts", str(restarts), "-m", "meshplan.cli.main", "run", "plans/llama.plan",
            "--model", "tiny-llama", "--set", f"tp={tp}", "--seq-len", "64", "--steps", str(steps),
            "--checkpoint-dir", str(checkpoints), "--checkpoint-every", str(EVERY),
            "--metrics", str(metrics), "--log-every", "100", *extra]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(metrics: Path) -> dict[int, float]:
    """Step → loss; a step run twice (before a failure and after the restart) counts last."""
    out = {}
    for line in metrics.read_text("utf-8").splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def _workers(agent: int) -> dict[int, int]:
    """torchrun's worker processes of its first attempt: rank → pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and "RANK" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    return found


def _kill_a_rank_after_a_checkpoint(process: subprocess.Popen[str], checkpoints: Path) -> int:
    """Wait for the first complete checkpoint, then SIGKILL the last rank; returns its pid."""
    deadline = time.monotonic() + 240
    while not (checkpoints / f"step-{EVERY:08d}" / "COMPLETE").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    pid = _workers(process.pid)[RANKS - 1]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_rank_restarts_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = subprocess.run(_command(tmp_path / "ref", tmp_path / "ref.jsonl"), cwd=ROOT,
                               capture_output=True, text=True, timeout=300, env=_ENV)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
    expected = _losses(tmp_path / "ref.jsonl")
    assert sorted(expected) == list(range(1, STEPS + 1))

    process = subprocess.Popen(_command(tmp_path / "ckpt", tmp_path / "run.jsonl", restarts=1),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_ENV)
    try:
        _kill_a_rank_after_a_checkpoint(process, tmp_path / "ckpt")
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-4000:]
    assert "resumed from step" in output, output[-4000:]
    assert "internal error" not in output, output[-4000:]
    got = _losses(tmp_path / "run.jsonl")
    assert got == expected  # every step's loss, bit for bit (floats compared exactly)
    # The restart redid at least one step: the kill came after the first checkpoint.
    assert len((tmp_path / "run.jsonl").read_text("utf-8").splitlines()) >= STEPS

    # Resuming the reference under another layout (tp 1: dp 2 instead of 1) is refused clearly.
    other = subprocess.run(_command(tmp_path / "ref", tmp_path / "other.jsonl", tp=1, steps=STEPS + 2),
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=_ENV)
    text = other.stdout + other.stderr
    assert other.returncode != 0, text[-3000:]
    assert "cannot resume from" in text and "another layout" in text, text[-3000:]
    assert "internal error" not in text and f'File "{ROOT}' not in text, text[-3000:]  # no traceback of ours
    assert not (tmp_path / "other.jsonl").exists()  # nothing was trained or written
