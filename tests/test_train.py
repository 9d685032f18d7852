"""`plan run` under torchrun, the data pipeline behind it, and the loop's single-process parts.

The multi-rank numerics of the loop are in `test_runtime_equivalence.py`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meshplan.cli.main import main
from meshplan.runtime.train.data import (
    DataError,
    PackedData,
    load_sequences,
    read_token_jsonl,
    synthetic_sequences,
)

from .conftest import ROOT

# ----------------------------------------------------------------------------- plan run


@pytest.mark.slow
def test_plan_run_trains_under_torchrun() -> None:
    # The README's command, with context parallelism on top of tensor and sequence
    # parallelism (`torchrun` is `python -m torch.distributed.run`; --standalone
    # picks a free rendezvous port, so concurrent jobs on the machine do not collide).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
               "-m", "meshplan.cli.main", "run", "plans/llama.plan", "--model", "tiny-llama",
               "--set", "tp=2", "--set", "mesh.cp=2", "--seq-len", "256", "--steps", "5"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "on 4 ranks (gloo, cpu): cp 2 × tp 2; attention meshplan_sdpa" in output, output[-3000:]
    assert "context parallel: 2 ranks per sequence, headtail split, allgather attention" in output
    losses = [float(m) for m in re.findall(r"^step \d+/5  loss (\S+)", output, flags=re.M)]
    assert len(losses) == 5, output[-3000:]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # deterministic: seeded weights, data and order
    assert re.search(r"^trained 5 steps: loss \S+ → \S+, [\d,]+ tokens/s", output, flags=re.M)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_plan_run_usage_errors(no_process_group: None, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    import torch.distributed as dist

    code, err = _run(["run", str(tmp_path / "missing.plan"), "--model", "tiny-llama"], capsys)
    assert code == 2 and "no such file" in err
    code, err = _run(["run", str(ROOT / "plans" / "llama.plan"), "--model", "tiny-llama",
                      "--seq-len", "64", "--set", "seq_len=64"], capsys)
    assert code == 2 and "--seq-len or --set seq_len" in err
    code, err = _run(["run", str(ROOT / "plans" / "llama.plan"), "--model", "no-such-model"], capsys)
    assert code == 2 and "--model no-such-model" in err
    assert not dist.is_initialized()  # the group `plan run` made is gone


def test_init_is_idempotent_without_torchrun(no_process_group: None) -> None:
    import torch.distributed as dist

    from meshplan.runtime.train.environment import init

    env = init()
    try:
        assert (env.rank, env.world_size, env.backend, env.initialised_here) == (0, 1, "gloo", True)
        again = init()
        assert (again.rank, again.world_size, again.initialised_here) == (0, 1, False)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data


def test_token_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    path.write_text('[1, 2, 3]\n\n{"input_ids": [4, 5]}\n', encoding="utf-8")
    assert [s.tolist() for s in read_token_jsonl(path)] == [[1, 2, 3], [4, 5]]
    with pytest.raises(DataError, match=r"outside the model's vocabulary of 5"):
        load_sequences(path, vocab_size=5, seq_len=8)
    path.write_text('[1, 2]\n[3, -1]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"tokens\.jsonl:2: token ids must be non-negative"):
        read_token_jsonl(path)
    path.write_text('[1, 2]\n[3,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"tokens\.jsonl:2: not JSON"):
        read_token_jsonl(path)


def _tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "packed": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    directory = tmp_path / "tokenizer"
    fast.save_pretrained(str(directory))
    return directory


def test_text_jsonl_with_a_local_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "hello packed world"}) + "\n" + json.dumps("world hello") + "\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match="give --tokenizer DIR"):
        load_sequences(path, vocab_size=5, seq_len=8)
    seqs = load_sequences(path, vocab_size=5, seq_len=8, tokenizer=_tokenizer_dir(tmp_path))
    assert [s.tolist() for s in seqs] == [[2, 3, 4, 1], [4, 2, 1]]  # eos appended
    with pytest.raises(DataError, match="not a directory"):
        load_sequences(path, vocab_size=5, seq_len=8, tokenizer=tmp_path / "nowhere")


def test_synthetic_is_seeded_and_learnable() -> None:
    a = synthetic_sequences(32, 50, min_len=4, max_len=40, seed=7)
    b = synthetic_sequences(32, 50, min_len=4, max_len=40, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert {len(s) for s in a} <= set(range(4, 41)) and len({len(s) for s in a}) > 5
    successors: dict[int, set[int]] = {}
    for s in a:
        for x, y in zip(s[:-1].tolist(), s[1:].tolist(), strict=True):
            successors.setdefault(x, set()).add(y)
    assert max(len(v) for v in successors.values()) <= 4  # a walk over a fixed table


def _bins(data: PackedData, dp: int, micro: int, steps: int) -> list[list[tuple[int, ...]]]:
    loaders = [iter(data.loader(r, dp, micro_batch=micro, seed=3)) for r in range(dp)]
    out = []
    for _ in range(steps):
        step = [tuple(b["input_ids"].flatten().tolist()) for it in loaders for b in next(it)]
        out.append(sorted(step))
    return out


def test_global_batch_does_not_depend_on_its_split() -> None:
    data = PackedData.build(synthetic_sequences(80, 100, min_len=3, max_len=32, seed=1), 32)
    single = _bins(data, 1, 4, 5)
    assert _bins(data, 4, 1, 5) == single
    assert _bins(data, 2, 2, 5) == single
    batch = data.loader(0, 1, micro_batch=1, seed=3)
    first = next(iter(batch))[0]
    assert first["input_ids"].shape == (1, 32) and first["num_tokens"] <= 32
    assert 0 < int((first["labels"] != -100).sum()) < first["num_tokens"]  # shifted per sequence


def test_loader_resumes_mid_epoch() -> None:
    data = PackedData.build(synthetic_sequences(40, 100, min_len=3, max_len=32, seed=2), 32)
    straight = data.loader(1, 2, seed=5)
    batches = [b for _, b in zip(range(4), straight, strict=False)]
    stopped = data.loader(1, 2, seed=5)
    source = iter(stopped)
    for _ in range(3):
        next(source)
    resumed = data.loader(1, 2, seed=5)
    resumed.load_state_dict(stopped.state_dict())
    again = next(iter(resumed))
    assert torch.equal(again[0]["input_ids"], batches[3][0]["input_ids"])


# ----------------------------------------------------------------------------- loop parts


def test_clip_grad_norm_matches_torch_on_plain_tensors() -> None:
    from meshplan.runtime.train.loop import clip_grad_norm

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    norm = clip_grad_norm(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert float(clip_grad_norm(ours, None)) == pytest.approx(0.5, rel=1e-5)  # measure only


def test_progress_display_logs_plain_lines() -> None:
    from meshplan.cli.progress import ProgressDisplay
    from meshplan.runtime.train.loop import StepStats

    stream = io.StringIO()
    with ProgressDisplay(total=2, stream=stream) as show:
        show(StepStats(1, 5.25, 1.5, 1000, 990, 0.5))
        show(StepStats(2, 5.0, 1.25, 1000, 990, 0.25))
    lines = stream.getvalue().splitlines()
    assert lines == ["step 1/2  loss 5.2500  grad-norm 1.500  tokens 1,000  2,000 tokens/s  500 ms",
                     "step 2/2  loss 5.0000  grad-norm 1.250  tokens 1,000  4,000 tokens/s  250 ms"]
    silent = io.StringIO()
    with ProgressDisplay(total=1, stream=silent, enabled=False) as show:
        show(StepStats(1, 5.0, 1.0, 10, 9, 0.1))
    assert silent.getvalue() == ""


# ----------------------------------------------------------------------------- plan run: bad input

_RUN = ["run", str(ROOT / "plans" / "llama.plan"), "--model", "tiny-llama", "--set", "tp=1", "--seq-len", "64",
        "--steps", "2"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "nan"], "--lr nan: expected a finite number ≥ 0"),
    (["--lr", "inf"], "--lr inf: expected a finite number ≥ 0"),
    (["--lr", "-0.1"], "--lr -0.1: expected a finite number ≥ 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: expected an integer ≥ 0, got -1"),
    (["--checkpoint-every", "2"], "--checkpoint-every needs --checkpoint-dir"),
])
def test_plan_run_refuses_bad_numbers_up_front(no_process_group: None, capsys: pytest.CaptureFixture[str],
                                               extra: list[str], message: str) -> None:
    code, err = _run([*_RUN, *extra], capsys)
    assert code == 2 and message in err, err
    assert "internal error" not in err


def test_plan_run_refuses_a_checkpoint_dir_that_is_a_file(no_process_group: None, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "ckpt"
    target.write_text("not a directory", "utf-8")
    code, err = _run([*_RUN, "--checkpoint-dir", str(target)], capsys)
    assert code == 2 and f"--checkpoint-dir {target}: exists and is not a directory" in err, err
    assert target.read_text("utf-8") == "not a directory"
    code, err = _run([*_RUN, "--checkpoint-dir", str(target / "below")], capsys)
    assert code == 2 and "is not a directory" in err, err


def test_plan_run_refuses_data_it_cannot_train_on(no_process_group: None, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    beyond = tmp_path / "beyond.jsonl"
    beyond.write_text("[1, 2, 3]\n[4, 256, 5]\n", "utf-8")  # tiny-llama's vocabulary is 256
    code, err = _run([*_RUN, "--data", str(beyond), "--checkpoint-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "token id 256 is outside the model's vocabulary of 256" in err, err
    single = tmp_path / "single.jsonl"
    single.write_text("".join(f"[{i}]\n" for i in range(20)), "utf-8")
    code, err = _run([*_RUN, "--data", str(single), "--checkpoint-dir", str(tmp_path / "b")], capsys)
    assert code == 2 and "every sequence has a single token" in err, err
    assert "internal error" not in err and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plan_run_resume_under_another_layout_is_refused(no_process_group: None, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    code, err = _run([*_RUN, "--checkpoint-dir", str(ckpt), "--metrics", str(tmp_path / "m.jsonl")], capsys)
    assert code == 0, err
    assert "checkpoint: step 2 saved in" in err and "[" in err.splitlines()[0]  # phases, then checkpoints
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text("utf-8").splitlines()] == [1, 2]
    before = sorted(p.name for p in ckpt.iterdir())
    code, err = _run([*_RUN[:-1], "4", "--micro-batch", "2", "--checkpoint-dir", str(ckpt)], capsys)
    assert code == 1, err
    assert "cannot resume from" in err and "micro_batch=1 (now 2)" in err, err
    assert "internal error" not in err
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing written


def test_a_broken_collective_is_a_peer_failure_not_an_internal_error() -> None:
    from meshplan.runtime.train.environment import TrainError, is_peer_failure

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:17298")
    assert is_peer_failure(gloo)
    assert not is_peer_failure(TrainError("gloo is the backend, and this is our own message"))
    assert not is_peer_failure(ValueError("connection closed by peer"))  # not a transport error type
    assert not is_peer_failure(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("plan", ["llama_lora.plan", "llama_qlora.plan"])
def test_plan_run_trains_the_adapter_plans_and_resumes_from_adapter_only_checkpoints(
        no_process_group: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], plan: str) -> None:
    """The shipped adapter plans train under `plan run`; its checkpoints hold the adapters
    and their optimizer state only (the base comes from --model again; an NF4 base has no
    safetensors form), and a resume continues with the same losses."""
    from safetensors import safe_open

    overrides = ["--set", "dropout=0.0", "--set", "tp=1"] if plan == "llama_lora.plan" else ["--set", "dropout=0.0"]
    if plan == "llama_qlora.plan":  # tiny-llama's k/v projections hold 2048 values: smaller NF4 scaler blocks
        text = (ROOT / "plans" / plan).read_text("utf-8").replace("compute = bf16", "compute = fp32, "
                                                                  "block_size = 32, scaler_block_size = 32")
        (tmp_path / plan).write_text(text.replace("mixed_precision { param = bf16, reduce = fp32 }", ""), "utf-8")
        path = str(tmp_path / plan)
    else:
        path = str(ROOT / "plans" / plan)
    ckpt = tmp_path / "ckpt"
    args = ["run", path, "--model", "tiny-llama", *overrides, "--seq-len", "64", "--steps", "4",
            "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt)]
    code, err = _run([*args, "--metrics", str(tmp_path / "a.jsonl")], capsys)
    assert code == 0, err
    names: set[str] = set()
    for file in (ckpt / "step-00000002").rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    assert names and all("lora_" in n for n in names if not n.startswith("optim/param_groups")), sorted(names)[:5]
    shutil.rmtree(ckpt / "step-00000004")
    code, err = _run([*args, "--metrics", str(tmp_path / "b.jsonl")], capsys)
    assert code == 0, err
    first = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text("utf-8").splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text("utf-8").splitlines()]
    assert [(r["step"], r["loss"]) for r in again] == [(r["step"], r["loss"]) for r in first[2:]]
