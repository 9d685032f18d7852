"""Adapter (PEFT LoRA) checkpoints and their export, on a sharded model.

On 4 gloo ranks, tiny-llama with LoRA on exact module names, in two layouts: FSDP2 over
the 4 ranks, and dp 2 × tp 2 (PEFT's tensor-parallel layout by hand, FSDP2 over dp):
train 2 steps, save an adapter-only checkpoint, train a third (loss L3); a fresh model
(its adapters perturbed) resumes from the checkpoint and trains the third step: the same
L3, the same adapters and optimizer state, on every rank. The checkpoint holds no base
weight and every rank's shards. Exports: PEFT's files (the same bytes from the sharded
model, from a one-process model and from the checkpoint directory; loaded by
`PeftModel.from_pretrained` with the distributed model's logits) and the merged model
(loaded by `from_pretrained`, the PEFT model's logits). `plan export` through the CLI,
with its errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan.cli.main import main
from meshplan.runtime.weights import adapters as adapters_module
from meshplan.runtime.weights.adapters import (
    ADAPTER_FILE,
    CONFIG_FILE,
    export_adapter,
    export_merged,
    load_adapters,
    peft_name,
    save_adapters,
)
from meshplan.runtime.weights.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    read_marker,
    read_tensors,
    save,
)
from meshplan.runtime.weights.loading import full_state_dict, init_random, materialize, meta_model
from tests.distributed import RankPool

pytestmark = pytest.mark.slow

WORLD = 4
SPEC = "tiny-llama"
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
RANK, ALPHA = 4, 8
TOLERANCE = 1e-5


# --------------------------------------------------------------------------- models


LAYOUTS = ("fsdp", "tp")  # FSDP2 over 4 ranks; dp 2 × tp 2 (FSDP2 over dp, PEFT's TP layout)
_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def _tensor_parallel(model: nn.Module, tp: Any) -> None:
    """Megatron's layout on every projection; an adapted one as PEFT lays it out: the
    style on `base_layer`, a colwise base's lora_B colwise (lora_A replicated), a rowwise
    base's lora_A rowwise (lora_B replicated)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for layer in model.model.layers:
        for name in _COLWISE + _ROWWISE:
            module = layer.get_submodule(name)
            style = ColwiseParallel if name in _COLWISE else RowwiseParallel
            if hasattr(module, "base_layer"):
                parallelize_module(module.base_layer, tp, style())
                adapter = module.lora_B if name in _COLWISE else module.lora_A
                parallelize_module(adapter["default"], tp, style())
            else:
                parallelize_module(module, tp, style())


def _adapted(layout: str | None, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """tiny-llama with LoRA on TARGETS (exact names), laid out as `layout` (None: one process)."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = meta_model(SPEC)
    targets = [name for name, _ in model.named_modules() if name.endswith(TARGETS)]
    inject_adapter_in_model(LoraConfig(target_modules=targets, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                       bias="none"), model)
    if layout is not None:
        tp = 2 if layout == "tp" else 1
        mesh = init_device_mesh("cpu", (dist.get_world_size() // tp, tp), mesh_dim_names=("dp", "tp"))
        if tp > 1:
            _tensor_parallel(model, mesh["tp"])
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    materialize(model, "cpu")
    init_random(model, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.01)
    return model, optimizer


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, k: int, tp: int) -> float:
    """One data-parallel step on this data-parallel rank's batch; the loss averaged over the ranks."""
    ids = _ids(100 * k + dist.get_rank() // tp)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean / dist.get_world_size())


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, full (a collective)."""
    return {n: t for n, t in full_state_dict(model, buffers=False) if peft_name(n) is not None}


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return bool(sa) and sorted(sa) == sorted(sb) and all(
        sorted(sa[k]) == sorted(sb[k]) and all(torch.equal(_local(sa[k][n]), _local(sb[k][n])) for n in sa[k])
        for k in sa)


def _plain_base() -> nn.Module:
    """The unadapted tiny-llama with the base weights the adapted models hold (one process)."""
    adapted, _ = _adapted(None)
    base = {n.replace(".base_layer.", "."): t for n, t in full_state_dict(adapted) if peft_name(n) is None}
    plain = materialize(meta_model(SPEC), "cpu")
    plain.load_state_dict(base, strict=True)
    return plain.eval()


# --------------------------------------------------------------------------- the rank case


def train_resume_export_case(root: str, layout: str) -> dict[str, Any]:
    out = Path(root) / layout
    rank, tp = dist.get_rank(), 2 if layout == "tp" else 1
    a, opt_a = _adapted(layout)
    for k in range(2):
        _step(a, opt_a, k, tp)
    ck = save_adapters(checkpoint_dir(out / "ckpt", 2), a, opt_a, 2, {"rank": rank})
    export_adapter(a, out / "sharded-step2")
    l3 = _step(a, opt_a, 2, tp)

    b, opt_b = _adapted(layout)
    with torch.no_grad():  # other adapters than the saved ones: the resume must restore them
        for p in b.parameters():
            if p.requires_grad:
                _local(p).add_(0.5)
    differed = any(not torch.equal(x, y) for x, y in zip(_adapters(a).values(), _adapters(b).values(),
                                                          strict=True))
    step, loader = load_adapters(ck, b, opt_b)
    l3_resumed = _step(b, opt_b, 2, tp)
    after_a, after_b = _adapters(a), _adapters(b)

    a.eval()
    with torch.no_grad():
        logits = a(input_ids=_ids(7)).logits.detach().clone()
    export_adapter(a, out / "sharded-step3")
    export_merged(a, out / "merged")
    placements = {str(p.placements) for n, p in a.named_parameters() if "lora_" in n and isinstance(p, DTensor)}
    return {
        "l3": l3, "l3_resumed": l3_resumed, "step": step, "loader": loader, "differed": differed,
        "same_adapters": sorted(after_a) == sorted(after_b) and all(
            torch.equal(after_a[n], after_b[n]) for n in after_a),
        "same_state": _same_state(opt_a, opt_b), "logits": logits,
        "sharded": all(isinstance(p, DTensor) for p in a.parameters()), "placements": placements,
        "layout": layout,
    }


# --------------------------------------------------------------------------- fixtures


Trained = dict[str, tuple[Path, list[dict[str, Any]]]]  # layout → (its directory, each rank's result)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("adapters")
    with RankPool(WORLD, timeout=180.0) as pool:
        return {layout: (root / layout, pool.run(train_resume_export_case, str(root), layout))
                for layout in LAYOUTS}


@pytest.fixture(params=LAYOUTS)
def trained(request: pytest.FixtureRequest, runs: Trained) -> tuple[Path, list[dict[str, Any]]]:
    return runs[request.param]


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return _plain_base()


def _peft(base: nn.Module, directory: Path) -> nn.Module:
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=_ids(7)).logits
    return out


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------- resume


def test_resume_from_an_adapter_checkpoint_continues_exactly(trained: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = trained
    for rank, r in enumerate(results):
        assert r["sharded"] and r["differed"]
        if r["layout"] == "tp":  # a colwise base's lora_B and a rowwise base's lora_A: over tp too
            assert {"(_StridedShard(dim=0, sf=2), Shard(dim=0))", "(Shard(dim=0), Shard(dim=1))"} <= r["placements"]
        else:
            assert r["placements"] == {"(Shard(dim=0),)"}
        assert r["step"] == 2 and r["loader"] == {"rank": rank}
        assert r["l3_resumed"] == r["l3"], (rank, r["l3"], r["l3_resumed"])
        assert r["same_adapters"] and r["same_state"], rank
    assert len({r["l3"] for r in results}) == 1


def test_the_checkpoint_holds_every_shard_of_the_adapters_and_no_base_weight(
        trained: tuple[Path, list[dict[str, Any]]]) -> None:
    root, _ = trained
    ck = checkpoint_dir(root / "ckpt", 2)
    marker = read_marker(ck)
    assert marker is not None and marker["adapters_only"] and marker["world_size"] == WORLD
    assert marker["adapters"]["config"]["r"] == RANK and marker["adapters"]["config"]["peft_type"] == "LORA"
    keys: list[str] = []
    for f in sorted((ck / "tensors").glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            keys += list(handle.keys())
    assert len(list((ck / "tensors").glob("*.safetensors"))) == WORLD  # each rank wrote its shards
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), [k for k in keys if "lora_" not in k]
    # Every shard of every rank: the tensors read back whole equal the FSDP model's full_tensor().
    stored = read_tensors(ck)
    exported = load_file(str(root / "sharded-step2" / ADAPTER_FILE))
    assert {peft_name(n) for n in stored} == set(exported)
    for name, tensor in stored.items():
        assert torch.equal(tensor, exported[str(peft_name(name))]), name
    size = sum(f.stat().st_size for f in (ck / "tensors").glob("*.safetensors"))
    model_bytes = sum(p.numel() * p.element_size() for p in meta_model(SPEC).parameters())
    assert size < model_bytes / 4, (size, model_bytes)


# --------------------------------------------------------------------------- export


def test_export_from_shards_equals_one_process_and_the_checkpoint(trained: tuple[Path, list[dict[str, Any]]],
                                                                 tmp_path: Path) -> None:
    root, _ = trained
    ck = checkpoint_dir(root / "ckpt", 2)
    one, _ = _adapted(None)
    assert load_adapters(ck, one)[0] == 2  # 4 ranks' shards resharded onto one process
    export_adapter(one, tmp_path / "one")
    export_adapter(ck, tmp_path / "from-dir")
    sharded = _files(root / "sharded-step2")
    assert sorted(sharded) == [CONFIG_FILE, ADAPTER_FILE]
    assert _files(tmp_path / "one") == sharded == _files(tmp_path / "from-dir")


def test_peft_loads_the_export_with_the_distributed_logits(trained: tuple[Path, list[dict[str, Any]]],
                                                           base: nn.Module) -> None:
    root, results = trained
    config = json.loads((root / "sharded-step3" / CONFIG_FILE).read_text("utf-8"))
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", RANK,
                                                                                                ALPHA, 0.0)
    assert config["inference_mode"] is True and config["bias"] == "none"
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) == 8
    assert config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    with safe_open(str(root / "sharded-step3" / ADAPTER_FILE), "pt") as handle:
        names = sorted(handle.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert all(n.startswith("base_model.model.") and ".default" not in n for n in names)
    peft = _peft(base, root / "sharded-step3")
    reference = results[0]["logits"]
    assert (_logits(peft) - reference).abs().max().item() < TOLERANCE
    assert (_logits(base) - reference).abs().max().item() > 1e-3  # the adapters matter


def test_merged_export_loads_with_from_pretrained(trained: tuple[Path, list[dict[str, Any]]],
                                                  base: nn.Module) -> None:
    from transformers import AutoModelForCausalLM

    root, _ = trained
    merged_dir = root / "merged"
    assert sorted(p.name for p in merged_dir.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert not any("lora_" in n or "base_layer" in n for n in names)
    assert names == {n for n, _ in full_state_dict(base)}
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    peft = _peft(base, root / "sharded-step3")
    assert (_logits(merged) - _logits(peft)).abs().max().item() < TOLERANCE


# --------------------------------------------------------------------------- plan export


def test_cli_exports_adapter_files(trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = trained
    out = tmp_path / "adapter"
    code, _, err = _cli(["export", str(checkpoint_dir(root / "ckpt", 2)), "--adapter", "-o", str(out)], capsys)
    assert code == 0, err
    assert f"wrote {out}: adapter_config.json, adapter_model.safetensors (step 2, saved by 4 ranks)" in err
    assert _files(out) == _files(root / "sharded-step2")


def test_cli_exports_the_merged_model(trained: tuple[Path, list[dict[str, Any]]], base: nn.Module,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    root, _ = trained
    out = tmp_path / "merged"
    # The --checkpoint-dir itself: its newest complete checkpoint is taken.
    code, _, err = _cli(["export", str(root / "ckpt"), "--merged", "--model", SPEC, "-o", str(out)], capsys)
    assert code == 0, err
    assert "the newest complete checkpoint" in err and "base weights random (seed 0)" in err
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    peft = _peft(base, root / "sharded-step2")
    assert (_logits(merged) - _logits(peft)).abs().max().item() < TOLERANCE


def test_cli_errors(runs: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = runs["fsdp"]
    ck = str(checkpoint_dir(root / "ckpt", 2))

    missing = tmp_path / "missing"
    code, out, err = _cli(["export", str(missing), "--adapter", "-o", str(tmp_path / "o1")], capsys)
    assert (code, out) == (2, "") and f"plan export: error: no such checkpoint directory: {missing}" in err

    plain = materialize(meta_model(SPEC), "cpu")
    init_random(plain, 0)
    save(tmp_path / "plain", plain, None, 0)  # a checkpoint of a model without adapters
    code, _, err = _cli(["export", str(tmp_path / "plain"), "--adapter", "-o", str(tmp_path / "o2")], capsys)
    assert code == 1 and "holds no adapters" in err and "nothing to export" in err

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("mine", "utf-8")
    code, _, err = _cli(["export", ck, "--adapter", "-o", str(existing)], capsys)
    assert code == 2 and f"-o {existing}: exists (--force replaces it)" in err
    assert [p.name for p in existing.iterdir()] == ["keep"]
    code, _, err = _cli(["export", ck, "--adapter", "-o", str(existing), "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in existing.iterdir()) == [CONFIG_FILE, ADAPTER_FILE]

    code, _, err = _cli(["export", ck, "--merged", "-o", str(tmp_path / "o3")], capsys)
    assert code == 2 and "--merged needs --model M" in err
    code, _, err = _cli(["export", ck, "--merged", "--model", "no-such-model", "-o", str(tmp_path / "o4")],
                        capsys)
    assert code == 2 and "--model no-such-model" in err
    code, _, err = _cli(["export", ck, "-o", str(tmp_path / "o5")], capsys)
    assert code == 2 and "one of the arguments --adapter --merged is required" in err
    code, _, err = _cli(["export", ck, "--adapter", "--dtype", "bf16", "-o", str(tmp_path / "o6")], capsys)
    assert code == 2 and "--dtype applies to --merged only" in err

    damaged = tmp_path / "damaged"
    shutil.copytree(ck, damaged)
    shard = sorted((damaged / "tensors").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one bit of one rank's adapter shards
    shard.write_bytes(bytes(data))
    code, _, err = _cli(["export", str(damaged), "--adapter", "-o", str(tmp_path / "o7")], capsys)
    assert code == 1 and "is damaged" in err and f"{shard}: contents changed" in err
    # Nothing half-written by any refusal.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "existing", "plain"]


def test_cli_merged_dtype(runs: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = runs["fsdp"]
    out = tmp_path / "bf16"
    code, _, err = _cli(["export", str(checkpoint_dir(root / "ckpt", 2)), "--merged", "--model", SPEC,
                         "--dtype", "bf16", "-o", str(out)], capsys)
    assert code == 0, err
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text("utf-8"))["dtype"] == "bfloat16"


def test_resume_refuses_a_model_with_other_adapters(runs: Trained) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    root, _ = runs["fsdp"]
    model = meta_model(SPEC)
    inject_adapter_in_model(LoraConfig(target_modules=["model.layers.0.self_attn.q_proj"], r=RANK,
                                       lora_alpha=ALPHA, bias="none"), model)
    materialize(model, "cpu")
    with pytest.raises(adapters_module.CheckpointError, match="holds the adapters of another model"):
        load_adapters(checkpoint_dir(root / "ckpt", 2), model)


def test_cli_exports_from_a_full_checkpoint_of_an_adapted_model(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A full checkpoint (base and adapters, as `plan run` saves) records the adapters too:
    both exports read it, the merged one taking the base from the checkpoint."""
    from transformers import AutoModelForCausalLM

    model, _ = _adapted(None, seed=3)
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save(tmp_path / "full", model, None, 5)
    marker = read_marker(tmp_path / "full")
    assert marker is not None and not marker["adapters_only"] and marker["adapters"]["config"]["r"] == RANK
    code, _, err = _cli(["export", str(tmp_path / "full"), "--adapter", "-o", str(tmp_path / "adapter")], capsys)
    assert code == 0, err
    export_adapter(model, tmp_path / "direct")
    assert _files(tmp_path / "adapter") == _files(tmp_path / "direct")
    code, _, err = _cli(["export", str(tmp_path / "full"), "--merged", "--model", SPEC, "-o",
                         str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert (_logits(merged) - _logits(model.eval())).abs().max().item() < TOLERANCE
    # The base came from the checkpoint (seed 3), not from --model's seeded weights (seed 0).
    assert (_logits(merged) - _logits(_plain_base())).abs().max().item() > 1e-3


def test_merging_an_adapter_on_a_tied_head_is_refused(tmp_path: Path) -> None:
    """The compiler warns (W108): merging into one name of a tied tensor changes the
    other name too, so the merged model would not be the trained one."""
    from peft import LoraConfig, inject_adapter_in_model

    from meshplan.planner.models import resolve_model

    source = resolve_model("tiny-llama")
    assert source.config is not None and source.model_class is not None
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.tie_word_embeddings = True
    model = source.model_class(config)
    model.tie_weights()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]), model)
    with pytest.raises(CheckpointError, match="one tied tensor"):
        export_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
