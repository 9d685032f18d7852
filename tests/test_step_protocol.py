"""The step protocol: every step kind says what it touches, and has an entry in each
table that gives it meaning (apply, emit); nothing else tells step kinds apart."""

from __future__ import annotations

from functools import cache

import pytest

from meshplan.planner import compile_plan
from meshplan.planner.emit import EMITTERS
from meshplan.planner.program import (
    STEP_TYPES,
    Checkpoint,
    ContextParallel,
    FullyShard,
    MeshLayout,
    Parallelize,
    Program,
    StyleCall,
)
from meshplan.runtime.parallel.apply import STEPS

from .conftest import PLANS


@cache
def llama() -> Program:
    return compile_plan(PLANS / "llama.plan", "tiny-llama", 16,
                        ["tp=2", "mesh.cp=2", "mesh.dp_replicate=2"]).program


@pytest.mark.parametrize("kind", sorted(STEP_TYPES))
def test_every_kind_is_applied_and_emitted(kind: str) -> None:
    cls = STEP_TYPES[kind]
    assert cls.kind == kind
    assert cls in STEPS, f"runtime.parallel.apply.STEPS has no entry for {kind} steps"
    assert cls in EMITTERS, f"planner.emit.EMITTERS has no entry for {kind} steps"


def test_steps_of_keeps_program_order() -> None:
    program = llama()
    for cls in (Parallelize, Checkpoint, ContextParallel, FullyShard):
        assert program.steps_of(cls) == tuple(s for s in program.steps if type(s) is cls)
    assert program.steps_of(FullyShard)[-1].fqns == ()  # the root comes last
    assert sum(len(program.steps_of(c)) for c in STEP_TYPES.values()) == len(program.steps)


CALL = StyleCall(style="colwise")


def test_modules_and_dims() -> None:
    par = Parallelize(fqn="model.layers.0", mesh_dim="tp", plan=(("", CALL), ("mlp.up_proj", CALL)))
    assert par.modules() == ("model.layers.0", "model.layers.0.mlp.up_proj") and par.dims() == ("tp",)
    rest = Parallelize(fqn="", mesh_dim="tp", plan=(("lm_head", CALL),))
    assert rest.modules() == ("", "lm_head")
    ac = Checkpoint(fqn="model.layers.1", mode="full")
    assert ac.modules() == ("model.layers.1",) and ac.dims() == ()
    cp = ContextParallel(fqns=("a", "b"), mesh_dim="cp", load_balance="headtail", rotate="ring")
    assert cp.modules() == ("a", "b") and cp.dims() == ("cp",)
    fs = FullyShard(fqns=(), mesh_dims=("dp_replicate", "fsdp"), reshard_after_forward=True)
    assert fs.modules() == () and fs.dims() == ("dp_replicate", "fsdp")
    # A failure names the modules the call is made on: the block, not its children.
    assert par.targets() == ("model.layers.0",) and cp.targets() == ("a", "b")
    # The dry run leaves context parallelism out (its traffic is derived), applies the rest.
    assert not ContextParallel.in_dry_run
    assert Parallelize.in_dry_run and Checkpoint.in_dry_run and FullyShard.in_dry_run


def test_a_step_on_a_missing_dimension_is_refused_by_the_program() -> None:
    mesh = MeshLayout(names=("dp_shard",), shape=(2,))
    step = Checkpoint(fqn="a", mode="full")
    Program(plan="p", model="m", world_size=2, mesh=mesh, steps=(step,))
    cp = ContextParallel(fqns=("a",), mesh_dim="cp", load_balance="none", rotate="allgather")
    with pytest.raises(ValueError, match="a context_parallel step uses mesh dimension 'cp'"):
        Program(plan="p", model="m", world_size=2, mesh=mesh, steps=(cp,))


def test_renamed_drops_steps_whose_modules_are_gone() -> None:
    def rename(fqn: str) -> str | None:
        return None if fqn.startswith("model.layers.1") else fqn.replace("layers.2", "layers.1")

    assert Checkpoint(fqn="model.layers.1", mode="full").renamed(rename) is None
    assert Checkpoint(fqn="model.layers.2", mode="full").renamed(rename) == Checkpoint(
        fqn="model.layers.1", mode="full")
    unit = FullyShard(fqns=("model.layers.1", "model.layers.2"), mesh_dims=("dp_shard",),
                      reshard_after_forward=True)
    assert unit.renamed(rename) == FullyShard(fqns=("model.layers.1",), mesh_dims=("dp_shard",),
                                              reshard_after_forward=True)
    gone = FullyShard(fqns=("model.layers.1",), mesh_dims=("dp_shard",), reshard_after_forward=True)
    assert gone.renamed(rename) is None
    root = FullyShard(fqns=(), mesh_dims=("dp_shard",), reshard_after_forward=True)
    assert root.renamed(rename) == root  # the root unit names no module: it stays
    par = Parallelize(fqn="model.layers.2", mesh_dim="tp", plan=(("mlp.up_proj", CALL),))
    renamed = par.renamed(rename)
    assert isinstance(renamed, Parallelize) and renamed.fqn == "model.layers.1" and renamed.plan == par.plan


def test_signatures_factor_the_block_out() -> None:
    program = llama()
    blocks = ("model.layers.0", "model.layers.1")
    signatures = [tuple(sig for i, s in enumerate(program.steps) if (sig := s.signature(b, i)) is not None)
                  for b in blocks]
    # The two layers are planned alike but for FSDP's `auto`: the last unit stays unsharded.
    assert signatures[0][:3] == signatures[1][:3] and signatures[0][3] != signatures[1][3]
    kinds = [sig[0] for sig in signatures[0]]
    assert kinds == ["parallelize", "context_parallel", "checkpoint", "fully_shard"]
    # The root unit and the rest-of-model call say nothing about a block.
    assert program.steps_of(FullyShard)[-1].signature(blocks[0], 0) is None
    other = Checkpoint(fqn="model.layers.0", mode="selective")
    assert other.signature(blocks[0], 0) != Checkpoint(fqn="model.layers.0", mode="full").signature(blocks[0], 0)
    assert other.signature(blocks[1], 0) is None
