"""Model weights: meta construction with real buffers, sharded safetensors loading,
rank-0 broadcast loading, and deterministic random init — on 4 gloo ranks against a
single-process reference, bitwise."""

from __future__ import annotations

import copy
import functools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from meshplan.planner.compile import compile_plan
from meshplan.planner.models import build_meta_model, resolve_model
from meshplan.planner.program import Program
from meshplan.runtime.parallel.apply import apply
from meshplan.runtime.weights import loading
from meshplan.runtime.weights.loading import (
    LoadError,
    full_state_dict,
    init_random,
    load_broadcast,
    load_sharded,
    materialize,
    meta_model,
    meta_params,
    weight_entries,
)
from tests.conftest import PLANS
from tests.distributed import RankPool

pytestmark = pytest.mark.slow

WORLD = 4
# spec → (plan, how the test writes its safetensors)
MODELS = {
    "tiny-llama": ("llama.plan", "sharded"),  # HSDP-capable mesh, _StridedShard, 2 files + index
    "tiny-phi3": ("phi3.plan", "single"),  # fused qkv_proj / gate_up_proj (rank-major rows)
    "tiny-gpt2": ("gpt2.plan", "single"),  # Conv1D (fused c_attn), tied wte / lm_head
}

_SHARED: dict[str, RankPool] = {}


def shared_pool(request: pytest.FixtureRequest) -> RankPool:
    """One 4-rank pool for this module and test_checkpoint.py: spawning the ranks and
    importing torch and transformers in each costs more than all the cases together.
    It is closed when the test session ends."""
    pool = _SHARED.get("pool")
    if pool is None:
        pool = RankPool(WORLD, timeout=120.0)
        request.config.add_cleanup(pool.close)
        _SHARED["pool"] = pool
    pool.start()
    return pool


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> RankPool:
    return shared_pool(request)


# --------------------------------------------------------------------------- fixtures


@functools.cache
def compile_programs() -> dict[str, Program]:
    """The shipped plans at tp = 2 on 4 ranks (compiled once per test session)."""
    return {spec: compile_plan(PLANS / plan, spec, WORLD, ["tp=2"]).program
            for spec, (plan, _) in MODELS.items()}


def random_weights(spec: str, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of `spec` (one name per tied tensor) filled with randn: norms and
    biases too, so that bitwise comparisons mean something."""
    model = meta_model(spec)
    g = torch.Generator().manual_seed(seed)
    return {e.name: torch.randn(tuple(e.tensor.shape), generator=g) for e in weight_entries(model)}


def write_weights(directory: Path, weights: dict[str, torch.Tensor], layout: str) -> Path:
    """A Hugging Face directory: `model.safetensors`, or two files plus the index."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "single":
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(weights)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}), "utf-8")
    return directory


@pytest.fixture(scope="module")
def programs() -> dict[str, Program]:
    return compile_programs()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (spec, (_, layout)) in enumerate(MODELS.items()):
        weights = random_weights(spec, seed=100 + i)
        out[spec] = (write_weights(root / spec, weights, layout), weights)
    return out


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    differ = [k for k in expected if actual[k].dtype != expected[k].dtype
              or not torch.equal(actual[k], expected[k])]
    assert not differ, f"differ: {differ}"


# --------------------------------------------------------------------------- rank cases


class _CountingSlice:
    def __init__(self, inner: Any, key: str, counts: Counter[str]) -> None:
        self.inner, self.key, self.counts = inner, key, counts

    def get_shape(self) -> list[int]:
        return list(self.inner.get_shape())

    def get_dtype(self) -> str:
        return str(self.inner.get_dtype())

    def __getitem__(self, item: Any) -> torch.Tensor:
        t = self.inner[item]
        self.counts[self.key] += t.numel()
        return t


class _CountingFile:
    """A `safe_open` handle that counts every element handed out, per tensor."""

    def __init__(self, inner: Any, counts: Counter[str], whole: list[str]) -> None:
        self.inner, self.counts, self.whole = inner, counts, whole

    def __enter__(self) -> _CountingFile:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self.inner.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self.inner.keys())

    def get_slice(self, key: str) -> _CountingSlice:
        return _CountingSlice(self.inner.get_slice(key), key, self.counts)

    def get_tensor(self, key: str) -> torch.Tensor:
        self.whole.append(key)
        t = self.inner.get_tensor(key)
        self.counts[key] += t.numel()
        return t


def _forward(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = (torch.arange(16).view(1, 16) * 7) % vocab
    with torch.no_grad():
        # Explicit positions: under sequence parallelism the model sees 16 / tp tokens
        # per rank after the embedding and would derive positions from that.
        logits = model(input_ids=ids, position_ids=torch.arange(16).view(1, 16)).logits
    return (logits.full_tensor() if isinstance(logits, DTensor) else logits).detach().clone()


def load_case(program: Program, spec: str, directory: str) -> dict[str, Any]:
    """Meta model → apply → materialize → load_sharded (counting every element read);
    then the same weights sharded by `apply` itself from a real model, for reference."""
    counts: Counter[str] = Counter()
    whole: list[str] = []
    real_open = loading.safe_open
    loading.safe_open = lambda path, framework, **kw: _CountingFile(
        real_open(path, framework=framework, **kw), counts, whole)
    try:
        applied = apply(program, meta_model(spec))
        materialize(applied)
        report = load_sharded(applied, directory)
    finally:
        loading.safe_open = real_open
    shapes = {}
    for e in weight_entries(applied.model):
        t = e.tensor
        local = t.to_local() if isinstance(t, DTensor) else t
        shapes[e.name] = (local.numel(), t.numel())
    # The reference: a real single-process model with the same weights, sharded by apply().
    reference = materialize(meta_model(spec))
    load_sharded(reference, directory)
    reference_applied = apply(program, reference)
    same_local = {}
    mine = {e.name: e.tensor for e in weight_entries(applied.model)}
    for e in weight_entries(reference_applied.model):
        a, b = mine[e.name], e.tensor
        a_local = a.to_local() if isinstance(a, DTensor) else a
        b_local = b.to_local() if isinstance(b, DTensor) else b
        same_local[e.name] = torch.equal(a_local, b_local)
    vocab = applied.model.config.vocab_size
    logits_equal = torch.equal(_forward(applied.model, vocab), _forward(reference_applied.model, vocab))
    full = dict(full_state_dict(applied))
    buffers = {n: b.detach().clone() for n, b in applied.model.named_buffers()}
    hooks_agree = loading.fused_rows(applied.model) == loading.fused_rows(applied.model, program)
    return {
        "read": dict(counts), "whole": whole, "shapes": shapes, "report": report.elements_read,
        "same_local": same_local, "logits_equal": logits_equal, "hooks_agree": hooks_agree,
        "full": full if dist.get_rank() == 0 else None,
        "buffers": buffers if dist.get_rank() == 0 else None,
    }


def init_case(program: Program, spec: str, seed: int, block_elements: int) -> dict[str, Any]:
    drawn: list[tuple[str, int]] = []
    real_seed = loading._block_seed

    def counting(seed: int, name: str, block: int) -> int:
        drawn.append((name, block))
        return real_seed(seed, name, block)

    applied = apply(program, meta_model(spec))
    materialize(applied)
    loading._block_seed = counting
    try:
        init_random(applied, seed, block_elements=block_elements)
    finally:
        loading._block_seed = real_seed
    full = dict(full_state_dict(applied))
    return {"drawn": drawn, "full": full if dist.get_rank() == 0 else None}


def broadcast_case(program: Program, spec: str, source: str) -> dict[str, torch.Tensor] | None:
    applied = apply(program, meta_model(spec))
    materialize(applied)
    load_broadcast(applied, source if dist.get_rank() == 0 else None)
    full = dict(full_state_dict(applied))
    return full if dist.get_rank() == 0 else None


def broadcast_error_case(program: Program, spec: str, source: str) -> str:
    applied = apply(program, meta_model(spec))
    materialize(applied)
    try:
        load_broadcast(applied, source if dist.get_rank() == 0 else None)
    except LoadError as e:
        return str(e)
    return "no error"


def indices_case() -> list[str]:
    """`global_indices` against DTensor's own sharding of real values, uneven shards,
    empty shards and `_StridedShard` included; returns the cases that disagree."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    cases: list[tuple[tuple[int, ...], list[Any]]] = [
        ((5, 7), [Shard(0), Shard(0)]),
        ((5, 7), [Shard(0), Shard(1)]),
        ((3, 2), [Shard(1), Shard(0)]),  # some ranks hold nothing
        ((8, 4), [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP over TP
        ((12, 4), [_StridedShard(1, split_factor=2), Shard(1)]),
        ((6, 5), [Replicate(), Shard(-1)]),
        ((9,), [Shard(0), Replicate()]),
    ]
    bad = []
    for shape, placements in cases:
        full = torch.arange(float(torch.Size(shape).numel())).view(shape)
        dt = distribute_tensor(full, mesh, placements)
        idx = loading.global_indices(dt)
        expected = full
        for d, i in enumerate(idx):
            expected = expected.index_select(d, i)
        if not torch.equal(dt.to_local(), expected):
            bad.append(f"{shape} {placements}")
    return bad


# --------------------------------------------------------------------------- distributed tests


def test_global_indices_agree_with_dtensor_sharding(pool: RankPool) -> None:
    assert pool.run(indices_case) == [[]] * WORLD



@pytest.mark.parametrize("spec", list(MODELS))
def test_sharded_load_reads_only_the_local_shard_and_gathers_bitwise(
        pool: RankPool, programs: dict[str, Program],
        checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]], spec: str) -> None:
    directory, original = checkpoints[spec]
    results = pool.run(load_case, programs[spec], spec, str(directory))
    assert_bitwise(results[0]["full"], original)
    for rank, r in enumerate(results):
        assert r["whole"] == [], f"rank {rank} read whole tensors {r['whole']}"
        assert r["read"] == r["report"], "the report counts what was read"
        for name, (local, full) in r["shapes"].items():
            # Each rank reads exactly the elements it holds, never a full sharded tensor.
            assert r["read"][name] == local, (rank, name)
            if local < full:
                assert r["read"][name] < full
        assert all(r["same_local"].values()), {k: v for k, v in r["same_local"].items() if not v}
        assert r["logits_equal"], "the loaded model computes what apply() on real weights computes"
        assert r["hooks_agree"]
    # In this plan every tensor is sharded: no rank held or read a full tensor.
    assert all(local < full for local, full in results[1]["shapes"].values())
    # Buffers computed for real at construction survive apply + materialize.
    reference = _cpu_model(spec)
    for name, value in dict(reference.named_buffers()).items():
        assert torch.equal(results[0]["buffers"][name], value), name


@pytest.mark.parametrize(("spec", "block_elements"), [("tiny-llama", 256), ("tiny-phi3", 1000),
                                                       ("tiny-gpt2", loading.BLOCK_ELEMENTS)])
def test_init_random_on_four_ranks_equals_one_process(
        pool: RankPool, programs: dict[str, Program], spec: str, block_elements: int) -> None:
    results = pool.run(init_case, programs[spec], spec, 11, block_elements)
    single = materialize(meta_model(spec))
    init_random(single, 11, block_elements=block_elements)
    assert_bitwise(results[0]["full"], dict(full_state_dict(single)))
    if block_elements == 256:
        # embed_tokens is [256, 64]: 4 rows a block, 64 blocks; each rank holds a
        # quarter of the rows and draws only the blocks that overlap them.
        for r in results:
            blocks = {b for n, b in r["drawn"] if n == "model.embed_tokens.weight"}
            assert 0 < len(blocks) <= 64 // 4 + 1


def test_broadcast_load_from_an_unsliceable_file(
        pool: RankPool, programs: dict[str, Program], tmp_path: Path,
        checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> None:
    _, original = checkpoints["tiny-phi3"]
    path = tmp_path / "pytorch_model.bin"
    torch.save(original, path)
    full = pool.run(broadcast_case, programs["tiny-phi3"], "tiny-phi3", str(path))[0]
    assert_bitwise(full, original)
    # A source rank 0 cannot read fails on every rank, not only on rank 0.
    errors = pool.run(broadcast_error_case, programs["tiny-phi3"], "tiny-phi3", str(tmp_path / "nope.bin"))
    assert all("rank 0 cannot read" in e and "nope.bin" in e for e in errors), errors


# --------------------------------------------------------------------------- single process


def _cpu_model(spec: str) -> torch.nn.Module:
    src = resolve_model(spec)
    config = copy.deepcopy(src.config)
    config.use_cache = False
    assert src.model_class is not None
    return src.model_class(config)


@pytest.fixture(scope="module")
def llama_dir(checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> Path:
    return checkpoints["tiny-llama"][0]


def test_broadcast_load_in_a_single_process(llama_dir: Path,
                                            checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> None:
    model = materialize(meta_model("tiny-llama"))
    load_broadcast(model, llama_dir)
    assert_bitwise(dict(full_state_dict(model)), checkpoints["tiny-llama"][1])


def test_meta_params_keeps_buffers_real() -> None:
    model = meta_model("tiny-llama")
    assert all(p.is_meta for p in model.parameters())
    reference = dict(_cpu_model("tiny-llama").named_buffers())
    assert reference, "the model has buffers"
    for name, b in model.named_buffers():
        assert not b.is_meta and torch.equal(b, reference[name]), name
    materialize(model)
    assert all(not p.is_meta for p in model.parameters())
    for name, b in model.named_buffers():
        assert torch.equal(b, reference[name]), name
    # register_parameter is restored afterwards.
    assert not torch.nn.Linear(2, 2).weight.is_meta
    with meta_params():
        lin = torch.nn.Linear(2, 2)
    assert lin.weight.is_meta and lin.bias is not None and lin.bias.is_meta


def test_materialize_keeps_tied_weights_tied() -> None:
    model = materialize(meta_model("tiny-gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert [e.name for e in weight_entries(model)].count("transformer.wte.weight") == 1


def test_materialize_refuses_meta_buffers() -> None:
    with pytest.raises(LoadError, match=r"model\.rotary_emb\.inv_freq is on the meta device"):
        materialize(build_meta_model("tiny-llama"))


def test_single_process_load_round_trip(
        checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> None:
    for spec, (directory, original) in checkpoints.items():
        model = materialize(meta_model(spec))
        report = load_sharded(model, directory)
        assert report.total_read == sum(t.numel() for t in original.values())
        assert_bitwise(dict(full_state_dict(model)), original)


def test_tied_weight_loads_from_either_name(tmp_path: Path,
                                            checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> None:
    _, original = checkpoints["tiny-gpt2"]
    renamed = {("lm_head.weight" if k == "transformer.wte.weight" else k): v for k, v in original.items()}
    write_weights(tmp_path, renamed, "single")
    model = materialize(meta_model("tiny-gpt2"))
    load_sharded(model, tmp_path)
    assert torch.equal(model.transformer.wte.weight, original["transformer.wte.weight"])


def test_hub_style_names_load(tmp_path: Path,
                              checkpoints: dict[str, tuple[Path, dict[str, torch.Tensor]]]) -> None:
    """GPT-2 on the Hub: names without `transformer.`, and old `attn.bias` masks."""
    _, original = checkpoints["tiny-gpt2"]
    hub = {k.removeprefix("transformer."): v for k, v in original.items()}
    hub["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    write_weights(tmp_path, hub, "single")
    model = materialize(meta_model("tiny-gpt2"))
    load_sharded(model, tmp_path)
    assert_bitwise(dict(full_state_dict(model)), original)


def _broken_copy(source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(source.glob("*.safetensors")):
        weights.update(load_file(f))
    edit(weights)
    return write_weights(target, weights, "single")


def test_missing_tensor_is_named(tmp_path: Path, llama_dir: Path) -> None:
    d = _broken_copy(llama_dir, tmp_path, lambda w: w.pop("model.norm.weight"))
    with pytest.raises(LoadError, match=r"1 model tensor\(s\) missing from .*: model\.norm\.weight"):
        load_sharded(materialize(meta_model("tiny-llama")), d)


def test_shape_mismatch_names_tensor_and_file(tmp_path: Path, llama_dir: Path) -> None:
    def edit(w: dict[str, torch.Tensor]) -> None:
        w["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64)

    d = _broken_copy(llama_dir, tmp_path, edit)
    with pytest.raises(LoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight in .*model\.safetensors "
                                        r"has shape \[64, 64\], but the model's .* is \[128, 64\]"):
        load_sharded(materialize(meta_model("tiny-llama")), d)


def test_unexpected_tensor_is_refused_when_strict(tmp_path: Path, llama_dir: Path) -> None:
    def edit(w: dict[str, torch.Tensor]) -> None:
        w["model.extra.weight"] = torch.zeros(2)

    d = _broken_copy(llama_dir, tmp_path, edit)
    model = materialize(meta_model("tiny-llama"))
    with pytest.raises(LoadError, match=r"holds 1 tensor\(s\) the model does not have: model\.extra\.weight"):
        load_sharded(model, d)
    load_sharded(model, d, strict=False)


def test_index_naming_a_missing_file(tmp_path: Path, llama_dir: Path) -> None:
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text("utf-8"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index), "utf-8")
    with pytest.raises(LoadError, match=r"maps .* to model-00001-of-00002\.safetensors, which does not exist"):
        load_sharded(materialize(meta_model("tiny-llama")), tmp_path)


def test_loading_needs_materialised_parameters_and_weights(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(LoadError, match=r"is on the meta device: call materialize\(model\) first"):
        load_sharded(meta_model("tiny-llama"), llama_dir)
    with pytest.raises(LoadError, match="holds no safetensors weights"):
        load_sharded(materialize(meta_model("tiny-llama")), tmp_path)
    with pytest.raises(LoadError, match="does not exist"):
        load_sharded(materialize(meta_model("tiny-llama")), tmp_path / "nowhere")


def test_init_rules_follow_the_model() -> None:
    llama = materialize(meta_model("tiny-llama"))
    init_random(llama, 0)
    assert torch.equal(llama.model.norm.weight, torch.ones(64))
    w = llama.model.layers[0].mlp.up_proj.weight
    assert abs(float(w.detach().std()) - llama.config.initializer_range) < 0.003
    gemma = materialize(meta_model("tiny-gemma2"))
    init_random(gemma, 0)
    assert torch.equal(gemma.model.norm.weight, torch.zeros_like(gemma.model.norm.weight))  # 1 + w
    gpt2 = materialize(meta_model("tiny-gpt2"))
    init_random(gpt2, 0)
    assert torch.equal(gpt2.transformer.h[0].attn.c_attn.bias, torch.zeros(192))
    assert torch.equal(gpt2.transformer.ln_f.weight, torch.ones(64))
    # Values depend on the seed and on the parameter's name, nothing else.
    other = materialize(meta_model("tiny-llama"))
    init_random(other, 1)
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, w)
    assert not torch.equal(llama.model.layers[0].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)

