"""Checkpoints: DCP save → load round trip (model, AdamW state, step, data-loader state)
on 4 gloo ranks, bitwise; atomicity under a failing rank; `latest()`; export of a
TP + FSDP model to a Hugging Face directory equal to the original weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from meshplan.planner.program import Program
from meshplan.runtime.parallel.apply import Applied, apply
from meshplan.runtime.weights import checkpoint
from meshplan.runtime.weights.checkpoint import (
    MARKER,
    CheckpointError,
    checkpoint_dir,
    export_hf,
    is_complete,
    latest,
    load,
    read_marker,
    save,
)
from meshplan.runtime.weights.loading import (
    checkpoint_files,
    full_state_dict,
    init_random,
    load_sharded,
    materialize,
    meta_model,
)
from tests.distributed import RankPool
from tests.test_loading import (
    MODELS,
    assert_bitwise,
    compile_programs,
    random_weights,
    shared_pool,
    write_weights,
)

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> RankPool:
    return shared_pool(request)  # the ranks test_loading.py uses, if it ran


@pytest.fixture(scope="module")
def programs() -> dict[str, Program]:
    return compile_programs()


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (spec, (_, layout)) in enumerate(MODELS.items()):
        weights = random_weights(spec, seed=200 + i)
        out[spec] = (write_weights(root / spec, weights, layout), weights)
    return out


# --------------------------------------------------------------------------- rank cases


def _model(program: Program, spec: str, seed: int) -> tuple[Applied, torch.optim.Optimizer]:
    applied = apply(program, meta_model(spec))
    materialize(applied)
    init_random(applied, seed)
    return applied, torch.optim.AdamW(applied.model.parameters(), lr=1e-2, weight_decay=0.1)


def _train_step(applied: Applied, optimizer: torch.optim.Optimizer, k: int) -> None:
    """A deterministic optimizer step: gradients derived from the parameters themselves."""
    for p in applied.model.parameters():
        p.grad = (p.detach() * 0.1 + 0.01 * k).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def _same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    if sorted(sa) != sorted(sb) or not sa:
        return False
    for k in sa:
        if sorted(sa[k]) != sorted(sb[k]):
            return False
        for name in sa[k]:
            x, y = _local(sa[k][name]), _local(sb[k][name])
            if not torch.equal(x, y):
                return False
    return True


def _same_params(a: Applied, b: Applied) -> bool:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    return sorted(pa) == sorted(pb) and all(torch.equal(_local(pa[n]), _local(pb[n])) for n in pa)


def round_trip_case(program: Program, spec: str, root: str) -> dict[str, Any]:
    rank = dist.get_rank()
    a, opt_a = _model(program, spec, seed=1)
    for k in range(2):
        _train_step(a, opt_a, k)
    loader = {"epoch": 1, "steps_consumed": 7 + rank, "seed": 3}
    path = save(checkpoint_dir(root, 2), a, opt_a, 2, loader)

    b, opt_b = _model(program, spec, seed=2)  # other weights, no optimizer state
    different_before = not _same_params(a, b)
    found = latest(root)
    step, loader_b = load(found, b, opt_b) if found is not None else (-1, None)
    same_params, same_state = _same_params(a, b), _same_optimizer_state(opt_a, opt_b)
    # One more step on both: equal again only if AdamW's moments and step count match.
    _train_step(a, opt_a, 5)
    _train_step(b, opt_b, 5)
    return {
        "path": str(path), "found": str(found), "step": step, "loader": loader_b,
        "different_before": different_before, "same_params": same_params,
        "same_state": same_state, "same_after_step": _same_params(a, b),
    }


def crash_case(program: Program, spec: str, root: str) -> dict[str, Any]:
    applied, opt = _model(program, spec, seed=1)
    _train_step(applied, opt, 0)
    save(checkpoint_dir(root, 1), applied, opt, 1, {"at": 1})
    _train_step(applied, opt, 1)
    real = checkpoint._write_rank

    def crash_after_writing(tmp: Path, state: dict[str, Any], loader: Any, rank: int) -> None:
        real(tmp, state, loader, rank)
        if rank == 1:
            raise OSError("simulated crash on rank 1 after writing its shards")

    checkpoint._write_rank = crash_after_writing
    try:
        save(checkpoint_dir(root, 2), applied, opt, 2, {"at": 2})
        error = "no error"
    except CheckpointError as e:
        error = str(e)
    finally:
        checkpoint._write_rank = real
    after_crash = latest(root)
    step, loader = load(after_crash, applied, opt) if after_crash is not None else (-1, None)
    return {"error": error, "latest": str(after_crash), "step": step, "loader": loader}


def resave_case(program: Program, spec: str, root: str) -> str:
    applied, opt = _model(program, spec, seed=1)
    save(checkpoint_dir(root, 2), applied, opt, 2, {"at": 2})
    return str(latest(root))


def export_case(program: Program, spec: str, directory: str, out: str, max_shard_bytes: int) -> None:
    applied = apply(program, meta_model(spec))
    materialize(applied)
    load_sharded(applied, directory)
    export_hf(applied, out, max_shard_bytes=max_shard_bytes)


# --------------------------------------------------------------------------- distributed tests


def test_dcp_round_trip_is_bitwise(pool: RankPool, programs: dict[str, Program], tmp_path: Path) -> None:
    results = pool.run(round_trip_case, programs["tiny-llama"], "tiny-llama", str(tmp_path))
    for rank, r in enumerate(results):
        assert r["path"] == r["found"] == str(checkpoint_dir(tmp_path, 2))
        assert r["different_before"]
        assert r["same_params"] and r["same_state"] and r["same_after_step"], r
        assert r["step"] == 2
        assert r["loader"] == {"epoch": 1, "steps_consumed": 7 + rank, "seed": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]
    marker = read_marker(tmp_path / "step-00000002")
    assert marker is not None and marker["step"] == 2 and marker["world_size"] == 4


def test_a_failed_save_leaves_no_complete_checkpoint(pool: RankPool, programs: dict[str, Program],
                                                     tmp_path: Path) -> None:
    results = pool.run(crash_case, programs["tiny-phi3"], "tiny-phi3", str(tmp_path))
    for r in results:
        # Every rank learns of the failure (none hangs), and nothing was committed.
        assert "failed on rank(s) [1]" in r["error"] and "simulated crash" in r["error"], r["error"]
        assert "nothing was committed" in r["error"]
        assert r["latest"] == str(checkpoint_dir(tmp_path, 1))
        assert r["step"] == 1 and r["loader"] == {"at": 1}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000001", "step-00000002.tmp-2"]
    partial = tmp_path / "step-00000002.tmp-2"
    assert any((partial / "tensors").glob("*.safetensors")) and not (partial / MARKER).exists()
    assert not is_complete(partial)
    assert latest(tmp_path) == checkpoint_dir(tmp_path, 1)
    # A later save of the same step replaces the leftovers and commits.
    assert pool.run(resave_case, programs["tiny-phi3"], "tiny-phi3", str(tmp_path))[0] == str(
        checkpoint_dir(tmp_path, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize("spec", list(MODELS))
def test_export_of_a_tp_fsdp_model_equals_the_original(
        pool: RankPool, programs: dict[str, Program], tmp_path: Path,
        originals: dict[str, tuple[Path, dict[str, torch.Tensor]]], spec: str) -> None:
    directory, original = originals[spec]
    out = tmp_path / "export"
    # llama: small shards, so the export has several files and an index.
    limit = 100_000 if spec == "tiny-llama" else 5 * 2**30
    pool.run(export_case, programs[spec], spec, str(directory), str(out), limit)
    files = checkpoint_files(out)
    exported: dict[str, torch.Tensor] = {}
    for f in sorted(set(files.values())):
        exported.update(load_file(f))
    assert_bitwise(exported, original)  # fused rows un-permuted, one name per tied tensor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left
    config = json.loads((out / "config.json").read_text("utf-8"))
    assert config["model_type"] == spec.split("-")[1] and config["vocab_size"] == 256
    if spec == "tiny-llama":
        assert (out / "model.safetensors.index.json").is_file() and len(set(files.values())) > 1
    else:
        assert set(files.values()) == {out / "model.safetensors"}
    # The export loads back, e.g. as the next job's starting point.
    model = materialize(meta_model(str(out)))
    load_sharded(model, out)
    assert_bitwise(dict(full_state_dict(model)), original)


# --------------------------------------------------------------------------- single process


def _fake_checkpoint(path: Path, step: int | None, marker: str | None = None) -> None:
    path.mkdir(parents=True)
    if marker is not None:
        (path / MARKER).write_text(marker, "utf-8")
    elif step is not None:
        (path / MARKER).write_text(json.dumps({"format": checkpoint.FORMAT, "step": step}), "utf-8")


def test_latest_picks_the_highest_complete_step(tmp_path: Path) -> None:
    assert latest(tmp_path) is None
    assert latest(tmp_path / "missing") is None
    _fake_checkpoint(tmp_path / "step-00000010", 10)
    _fake_checkpoint(tmp_path / "a-late-name", 30)  # the marker's step counts, not the name
    _fake_checkpoint(tmp_path / "step-00000040.tmp-40", 40)  # a temporary, even with a marker
    _fake_checkpoint(tmp_path / "step-00000050", None)  # no marker: interrupted
    _fake_checkpoint(tmp_path / "step-00000060", None, marker="{not json")
    _fake_checkpoint(tmp_path / "step-00000070", None, marker=json.dumps({"step": 70}))  # no format
    (tmp_path / "step-00000080").write_text("a file", "utf-8")
    assert latest(tmp_path) == tmp_path / "a-late-name"


def test_single_process_save_load_without_optimizer(tmp_path: Path) -> None:
    model = materialize(meta_model("tiny-gpt2"))
    init_random(model, 4)
    path = save(tmp_path / "ckpt", model, None, 3, None)
    other = materialize(meta_model("tiny-gpt2"))
    init_random(other, 5)
    assert load(path, other) == (3, None)
    assert_bitwise(dict(full_state_dict(other)), dict(full_state_dict(model)))
    assert other.lm_head.weight is other.transformer.wte.weight
    with pytest.raises(CheckpointError, match="exists"):
        save(path, model, None, 3)
    save(path, model, None, 4, overwrite=True)
    assert latest(tmp_path) == path and load(path, other)[0] == 4
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load(path, other, torch.optim.AdamW(other.parameters()))


def test_load_refuses_incomplete_and_other_fused_layouts(tmp_path: Path) -> None:
    model = materialize(meta_model("tiny-llama"))
    init_random(model, 0)
    path = save(tmp_path / "ckpt", model, None, 1)
    (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        load(path, model)
    path = save(tmp_path / "ckpt2", model, None, 1)
    marker = json.loads((path / MARKER).read_text("utf-8"))
    marker["fused"] = {"model.layers.0.mlp.gate_up_proj.weight": [0, 2, 2]}
    (path / MARKER).write_text(json.dumps(marker), "utf-8")
    with pytest.raises(CheckpointError, match="stores fused rows for the layout"):
        load(path, model)


def test_export_refuses_an_existing_directory(tmp_path: Path) -> None:
    model = materialize(meta_model("tiny-phi3"))
    init_random(model, 0)
    out = export_hf(model, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="exists"):
        export_hf(model, out)
    export_hf(model, out, dtype=torch.bfloat16, overwrite=True)
    exported = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert json.loads((out / "config.json").read_text("utf-8"))["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# --------------------------------------------------------------------------- hostile and damaged


class _Planted:
    """A pickle whose load creates `target`: what a crafted `.metadata` could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


def _saved_pair(root: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[int, dict[str, torch.Tensor]]]:
    """Checkpoints of steps 1 and 2 of one model under `root`; its weights at each step."""
    model = materialize(meta_model("tiny-llama"))
    init_random(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weights = {}
    for step in (1, 2):
        for p in model.parameters():
            p.grad = p.detach() * 0.1 + 0.01 * step
        opt.step()
        save(checkpoint_dir(root, step), model, opt, step, {"at": step})
        weights[step] = {k: v.clone() for k, v in full_state_dict(model)}
    return model, opt, weights


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = materialize(meta_model("tiny-llama"))
    init_random(model, 9)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _shard(directory: Path) -> Path:
    return next((directory / "tensors").glob("*.safetensors"))


def test_resume_never_unpickles(tmp_path: Path) -> None:
    import pickle

    target = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(target))
    # A checkpoint of this format with a planted `.metadata`: refused, unread.
    _saved_pair(tmp_path / "planted")
    (checkpoint_dir(tmp_path / "planted", 2) / ".metadata").write_bytes(payload)
    warnings_seen: list[str] = []
    model, opt = _fresh()
    found = checkpoint.load_latest(tmp_path / "planted", model, opt, on_warning=warnings_seen.append)
    assert found is not None and found[1] == 1  # the intact step 1
    assert ".metadata: not part of the checkpoint" in warnings_seen[0] and "step-00000002" in warnings_seen[0]
    # The older pickle-based format: refused by name.
    old = tmp_path / "old" / "step-00000005"
    old.mkdir(parents=True)
    (old / MARKER).write_text(json.dumps({"format": "meshplan-dcp/1", "step": 5}), "utf-8")
    (old / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match="whose metadata is a pickle"):
        load(old, model, opt)
    with pytest.raises(CheckpointError, match=r"holds no intact checkpoint.*can run code"):
        checkpoint.load_latest(old.parent, model, opt, on_warning=lambda _: None)
    assert not target.exists()
    pickle.loads(payload)  # the payload is live: loading it would have created the file
    assert target.exists()


def test_damaged_checkpoints_fall_back_with_a_warning(tmp_path: Path) -> None:
    _, _, weights = _saved_pair(tmp_path)
    # A flipped byte in the newest: step 1 is loaded instead, with a warning naming the file.
    shard = _shard(checkpoint_dir(tmp_path, 2))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    seen: list[str] = []
    other, other_opt = _fresh()
    found = checkpoint.load_latest(tmp_path, other, other_opt, on_warning=seen.append)
    assert found is not None and found[1:] == (1, {"at": 1})
    assert len(seen) == 1 and str(shard) in seen[0] and "sha256" in seen[0] and "falling back to step-00000001" in seen[0]
    assert_bitwise(dict(full_state_dict(other)), weights[1])
    with pytest.raises(CheckpointError, match="is damaged"):
        load(checkpoint_dir(tmp_path, 2), other, other_opt)
    # A truncated shard in the other: none is intact.
    shard = _shard(checkpoint_dir(tmp_path, 1))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="holds no intact checkpoint"):
        checkpoint.load_latest(tmp_path, other, other_opt, on_warning=seen.append)
    # Even unverified, a read failure (DCP's CheckpointException, a BaseException) is a CheckpointError.
    with pytest.raises(CheckpointError, match=r"reading .* failed on rank"):
        load(checkpoint_dir(tmp_path, 1), other, other_opt, verified=True)


def test_garbage_state_and_markers_are_damage(tmp_path: Path) -> None:
    _saved_pair(tmp_path)
    (checkpoint_dir(tmp_path, 2) / "state.json").write_text("{garbage", "utf-8")
    (checkpoint_dir(tmp_path, 1) / MARKER).write_text("\x00\x01", "utf-8")
    assert checkpoint.verify(checkpoint_dir(tmp_path, 2))[0].endswith("state.json: contents changed (sha256 differs)")
    seen: list[str] = []
    model, opt = _fresh()
    with pytest.raises(CheckpointError, match="holds no intact checkpoint"):
        checkpoint.load_latest(tmp_path, model, opt, on_warning=seen.append)
    assert any("step-00000001/COMPLETE: not a valid marker" in s for s in seen)
    assert any("state.json" in s for s in seen)
    assert checkpoint.load_latest(tmp_path / "empty", model, opt) is None


def damaged_case(program: Program, spec: str, root: str) -> dict[str, Any]:
    applied, opt = _model(program, spec, seed=1)
    _train_step(applied, opt, 0)
    save(checkpoint_dir(root, 1), applied, opt, 1, {"rank": dist.get_rank()})
    expected = {n: _local(p).clone() for n, p in applied.model.named_parameters()}
    _train_step(applied, opt, 1)
    save(checkpoint_dir(root, 2), applied, opt, 2, {"rank": dist.get_rank()})
    dist.barrier()
    if dist.get_rank() == 0:  # damage one rank's shard file of step 2
        shard = sorted((checkpoint_dir(root, 2) / "tensors").glob("*.safetensors"))[-1]
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x40
        shard.write_bytes(bytes(data))
    dist.barrier()
    b, opt_b = _model(program, spec, seed=2)
    seen: list[str] = []
    found = checkpoint.load_latest(root, b, opt_b, on_warning=seen.append)
    same = all(torch.equal(_local(p), expected[n]) for n, p in b.model.named_parameters())
    return {"step": found[1] if found else None, "loader": found[2] if found else None,
            "warnings": seen, "same": same}


def test_damage_on_one_rank_is_seen_by_all(pool: RankPool, programs: dict[str, Program], tmp_path: Path) -> None:
    results = pool.run(damaged_case, programs["tiny-llama"], "tiny-llama", str(tmp_path))
    for rank, r in enumerate(results):
        assert r["step"] == 1 and r["loader"] == {"rank": rank} and r["same"], r
        assert len(r["warnings"]) == 1 and "shard-00004" in r["warnings"][0], r["warnings"]
