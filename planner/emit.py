"""Program → a standalone Python script that uses only torch (context- and expert-parallel
steps excepted: they import meshplan's attention over a split sequence and its token
dispatch, which torch lacks).

The script defines `build_mesh(device_type)` and `apply(model, mesh)` and makes exactly
the calls the runtime makes, in the same order, each preceded by the plan line it came
from. Every step kind has one entry in `EMITTERS` (the step protocol, `program.Step`).

A pipelined Program (its first step a Pipeline over pp > 1) becomes a script whose
`apply(model, mesh, loss_fn)` cuts the model as `runtime.parallel.pipeline` does: this
rank's stage modules (the embedding on the first, the norm and head on the last, the
rotary embedding on each, the stage's layers under their own names), every other step
applied to each stage module as far as it holds that step's modules (one function per
stage, `_stage_<i>`; the root FSDP unit wraps the stage), then torch's `PipelineStage`s
and the schedule class by name (`get_schedule_class`); it returns the stages and the
schedule.

Styles are written from the style registry (`meshplan.dsl.styles`): each style call
becomes its record's constructor call, the very record `runtime.parallel.registry`
builds from, and the torch classes it names are imported. The styles torch lacks, and
the re-tying of tied parameters after each step, and a pipeline stage's module are
inlined from `planner.emitted_styles`: checked-in copies of the bodies of
`runtime/parallel/styles.py`, `runtime/parallel/ties.py` and `runtime/parallel/stage.py`
(which import only torch), tested equal to them. Nothing is
read from the installed package's files, and the planner imports no runtime module; the
compiler's soundness test applies script and runtime to one model and compares every
parameter's placements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import cast

from meshplan.dsl.styles import STYLES, TORCH_TP

from .emitted_styles import SOURCE as STYLES_SOURCE
from .emitted_styles import STAGE as STAGE_SOURCE
from .emitted_styles import TIES as TIES_SOURCE
from .program import (
    Adapters,
    Checkpoint,
    ContextParallel,
    ExpertParallel,
    FullyShard,
    MixedPrecision,
    Parallelize,
    Pipeline,
    Program,
    S,
    Step,
    StyleCall,
)


def style_source(call: StyleCall) -> str:
    """The constructor expression of the ParallelStyle the runtime builds for `call`
    (from the style registry's record, as the runtime's `make_style`)."""
    return str(STYLES[call.style].source(call))


def _torch_imports(steps: Iterable[Step]) -> list[str]:
    """Import lines for the torch constructors the program's styles use (the registry
    names them), with torch's placements and `parallelize_module`."""
    names: dict[str, set[str]] = {TORCH_TP: {"parallelize_module"}}
    for step in steps:
        if not isinstance(step, Parallelize):
            continue
        for _, call in step.plan:
            built = STYLES[call.style].construct(call)
            if built.module.split(".")[0] == "torch":
                names.setdefault(built.module, set()).add(built.name)
    lines = ["from torch.distributed.tensor import Partial, Replicate, Shard"]
    for module, found in sorted(names.items()):
        line = f"from {module} import {', '.join(sorted(found))}"
        lines += [line] if len(line) <= 100 else [f"from {module} import (", *(f"    {n}," for n in sorted(found)), ")"]
    return lines


# Every string that reaches the script is either a Python literal (`!r`), a name the
# Program validated (steps check their fields, `program.py`), or text in a comment or
# the docstring, which `_text` writes as it is only when it cannot end either: no line
# breaks of any kind (`isprintable` is false for \n, \r, U+2028, U+0085, …), no
# quotes, no backslashes. Anything else is written escaped: its ascii repr with every
# double quote as \x22 (inside the docstring a `"""` of the repr would end it).
def _text(value: str) -> str:
    if value.isprintable() and not any(c in value for c in "\"'\\"):
        return value
    return ascii(value).replace('"', "\\x22")


def _where(step: Step) -> str:
    return f"# {_text(str(step.span))}" if step.span.line else "#"


def _adapted_plan(step: Step, adapted: frozenset[str]) -> Step:
    """A Parallelize step as it applies to a model with adapters (as the runtime): the
    style on an adapted module goes to its `base_layer`, the style's adapter layout (the
    style registry's `adapter`) to `lora_A.default` and `lora_B.default`. A style that
    touches no parameter (prepare_input / prepare_output) stays on the module: it
    converts the activations base and adapter share."""
    if not isinstance(step, Parallelize) or not adapted:
        return step
    plan: list[tuple[str, StyleCall]] = []
    for relative, call in step.plan:
        full = ".".join(p for p in (step.fqn, relative) if p)
        record = STYLES[call.style]
        if full not in adapted or not (record.contract.weights or record.contract.replicated_params):
            plan.append((relative, call))
            continue
        if len(record.adapter) != 1:
            # The Program does not say the module's kind; every style with an adapter
            # layout has it for one kind (a Linear), which the compiler checked.
            raise ValueError(f"--emit python: `{call.style}` on the adapted module {full!r} has adapter layouts "
                             f"for {len(record.adapter)} module kinds; use --emit json")
        layout = next(iter(record.adapter.values()))(call)
        prefix = f"{relative}." if relative else ""
        plan += [(f"{prefix}base_layer", call),
                 (f"{prefix}lora_A.default", StyleCall(**asdict(layout.a))),
                 (f"{prefix}lora_B.default", StyleCall(**asdict(layout.b)))]
    return replace(step, plan=tuple(plan))


def to_python(program: Program) -> str:
    adapted = frozenset(f for step in program.steps_of(Adapters) for f in step.fqns)
    steps = [_adapted_plan(step, adapted) for step in program.steps]
    cut = _cut(program, steps)
    usage = (["    mesh = build_mesh(\"cuda\")",
              "    stages, schedule = apply(model, mesh, loss_fn, device=torch.device(\"cuda\", local_rank))",
              "    schedule.step(input_ids, position_ids)                    # the first stage's ranks",
              "    schedule.step(target=labels, losses=losses)               # the last stage's ranks",
              "",
              "Each rank cuts out its stages (RANKS[pp rank] of STAGES) and keeps only their",
              "modules' parameters, under the model's own names. The stages call each layer with",
              "`attention_mask=None`: the model's attention implementation is causal over each",
              "row, or builds the masks of packed rows from `position_ids` if it can."]
             if cut is not None else ["    mesh = build_mesh(\"cuda\")", "    apply(model, mesh)"])
    lines = [
        f'"""meshplan program: plan `{_text(program.plan)}` ({_text(program.source)}) for {_text(program.model)} '
        f"on {program.world_size} ranks.",
        "",
        "Generated by `plan compile --emit python`; needs only torch. Under torchrun:",
        "",
        *usage,
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import warnings",
        "",
        *(["import torch", "from torch import nn"] if cut is not None else []),
        "from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper",
        "from torch.distributed.device_mesh import init_device_mesh",
        "from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard",
        *(["from torch.distributed.pipelining import PipelineStage",
           "from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class"]
          if cut is not None else []),
        *_torch_imports(steps),
        "",
        "# ---- ParallelStyles torch lacks (meshplan/runtime/parallel/styles.py, verbatim) ----",
        STYLES_SOURCE,
        "",
        "# ---- tied parameters (meshplan/runtime/parallel/ties.py, verbatim) ----",
        TIES_SOURCE,
        "",
        "# ---- the program ----",
        "",
        f"MESH_NAMES = {tuple(n for n in program.mesh.names if n != 'ep')!r}",
        f"MESH_SHAPE = {tuple(s for n, s in zip(program.mesh.names, program.mesh.shape, strict=True) if n != 'ep')!r}",
        f"SUBMESHES = {dict(program.mesh.submeshes)!r}",
        "",
        "",
        "def build_mesh(device_type: str = \"cuda\"):",
        "    mesh = init_device_mesh(device_type, MESH_SHAPE, mesh_dim_names=MESH_NAMES)",
        "    for name, dims in SUBMESHES.items():",
        "        mesh[dims]._flatten(name)",
        "    return mesh",
        "",
        "",
        "def _mesh(mesh, names):",
        "    with warnings.catch_warnings():",
        "        warnings.filterwarnings(\"ignore\", message=\"Slicing a flattened dim\")",
        "        return mesh[names[0]] if len(names) == 1 else mesh[names]",
        "",
        "",
        "def _module(model, fqn):",
        "    return model.get_submodule(fqn) if fqn else model",
        "",
        "",
    ]
    if cut is None:
        lines += ["def apply(model, mesh):", *_apply_body(steps, adapted), "    return model", ""]
    else:
        lines += _pipelined(cut, steps, adapted)
    return "\n".join(lines)


def _cut(program: Program, steps: Sequence[Step]) -> Pipeline | None:
    """The step that cuts the model into stages (a Pipeline over pp > 1), which must come
    first, as the runtime's `apply` takes it; one of size 1 cuts nothing."""
    cuts = [(i, s) for i, s in enumerate(steps) if isinstance(s, Pipeline) and program.mesh.size(s.mesh_dim) > 1]
    if not cuts:
        return None
    if cuts[0][0] != 0 or len(cuts) > 1:
        raise ValueError("--emit python: the pipeline step must be the Program's only first step")
    return cuts[0][1]


def _apply_body(steps: Sequence[Step], adapted: frozenset[str]) -> list[str]:
    """The lines applying `steps` to `model` (the whole model, or one stage module)."""
    # As the runtime: a step that unties tied parameters (parallelize_module does) gets
    # them tied again after it.
    body: list[str] = ["    _ties = tied_groups(model)"]
    for step in steps:
        emit = EMITTERS.get(type(step))
        if emit is None:
            raise ValueError(f"--emit python: no emitter for {step.kind} steps")
        body.append(f"    {_where(step)}")
        keep = bool(adapted) and isinstance(step, Parallelize)
        if keep:
            # As the runtime: torch's SequenceParallel re-creates a norm's parameters
            # trainable (`nn.Parameter(DTensor.from_local(...))`), so a frozen base would
            # train; each parameter gets its own flag back.
            body.append(f"    _trainable = {{n: p.requires_grad for n, p in _module(model, "
                        f"{cast(Parallelize, step).fqn!r}).named_parameters()}}")
        body += emit(step)
        if keep:
            body += [f"    for _name, _param in _module(model, {cast(Parallelize, step).fqn!r}).named_parameters():",
                     "        if _name in _trainable:",
                     "            _param.requires_grad_(_trainable[_name])"]
        body.append("    retie(_ties)")
    return body


# The plan's schedule names -> the names torch's `get_schedule_class` knows.
SCHEDULE_NAMES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "interleaved_zero_bubble": "InterleavedZeroBubble",
    "zbv": "ZBVZeroBubble",
}


def stage_holds(step: Pipeline, index: int) -> tuple[str, ...]:
    """The modules stage `index` holds (as `runtime.parallel.stage.StageModule`): its
    layers, the rotary embedding, the embedding on the first stage, the norm and the head
    on the last."""
    last = len(step.stages) - 1
    return (*(f"{step.layers}.{i}" for i in step.stages[index]), *step.rotary,
            *(step.embed if index == 0 else ()), *(step.head if index == last else ()))


def _held(holds: tuple[str, ...], fqn: str) -> bool:
    """Is `fqn` a module of the stage holding `holds`: one of them, inside one, or one of
    the containers above them (`model`, `model.layers`, the stage itself)?"""
    return not fqn or any(fqn == h or fqn.startswith(h + ".") or h.startswith(fqn + ".") for h in holds)


def stage_program(steps: Sequence[Step], holds: tuple[str, ...]) -> list[Step]:
    """The steps after the cut as they apply to one stage module (as the runtime's
    `stage_steps`): each restricted to the modules the stage holds, the root FSDP unit
    wrapping the stage itself. Tensor-parallel plans keep only the entries the stage
    holds (torch's `parallelize_module` would warn of the others and skip them)."""
    out: list[Step] = []
    for step in steps:
        if isinstance(step, Pipeline):
            continue
        if isinstance(step, FullyShard) and not step.fqns:
            out.append(step)  # the root: the stage module is what the schedule calls
            continue
        kept = step.renamed(lambda fqn: fqn if _held(holds, fqn) else None)
        if isinstance(kept, Parallelize):
            block = kept.fqn
            plan = tuple((r, c) for r, c in kept.plan if _held(holds, ".".join(p for p in (block, r) if p)))
            kept = replace(kept, plan=plan) if plan else None
        if kept is not None:
            out.append(kept)
    return out


_PIPELINED_APPLY = '''

def apply(model, mesh, loss_fn=None, *, device=None, scale_grads=True):
    """Cut `model` into this rank's stage modules, apply the plan's other steps to each,
    and build torch's schedule over them; returns (stages, schedule). `loss_fn(logits,
    target)` is the last stage's loss per microbatch (None: forward only); with
    `scale_grads` the schedule divides the gradients by the number of microbatches."""
    pp = _mesh(mesh, (PIPELINE_DIM,))
    device = torch.device(device if device is not None else mesh.device_type)
    indices = RANKS[pp.get_local_rank()]
    stages = []
    for index in indices:
        stage = StageModule(model, STAGES[index], first=index == 0, last=index == len(STAGES) - 1)
        STAGE_STEPS[index](stage, mesh)
        stages.append(stage)
    made = [PipelineStage(stage, index, len(STAGES), device, group=pp.get_group())
            for stage, index in zip(stages, indices)]
    schedule_class = get_schedule_class(SCHEDULE)
    one = issubclass(schedule_class, PipelineScheduleSingle)  # these take one stage, the others a list
    schedule = schedule_class(made[0] if one else made, n_microbatches=MICROBATCHES, loss_fn=loss_fn,
                              scale_grads=scale_grads)
    return stages, schedule
'''


def _layers_text(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def _pipelined(cut: Pipeline, steps: Sequence[Step], adapted: frozenset[str]) -> list[str]:
    """The stage module, one function per stage applying its steps, and `apply`."""
    lines = [f"# ---- pipeline stages (meshplan/runtime/parallel/stage.py) ----\n\n{STAGE_SOURCE}", "", "",
             f"{_where(cut)}",
             f"PIPELINE_DIM = {cut.mesh_dim!r}",
             f"SCHEDULE = {SCHEDULE_NAMES[cut.schedule]!r}  # the plan's {cut.schedule}",
             f"MICROBATCHES = {cut.microbatches!r}",
             f"STAGES = {cut.stages!r}  # the {cut.layers} indices of each stage",
             f"RANKS = {cut.ranks!r}  # the stages each {cut.mesh_dim} rank holds",
             "", ""]
    for index, layers in enumerate(cut.stages):
        holds = stage_holds(cut, index)
        parts = [_layers_text(layers), *(["the embedding"] if index == 0 else []),
                 *(["the norm and the head"] if index == len(cut.stages) - 1 else [])]
        lines += [f"def _stage_{index}(model, mesh):",
                  f"    # stage {index}: {', '.join(parts)}",
                  *_apply_body(stage_program(steps, holds), adapted), "    return model", "", ""]
    lines += [f"STAGE_STEPS = ({', '.join(f'_stage_{i}' for i in range(len(cut.stages)))})",
              _PIPELINED_APPLY]
    return lines


def _parallelize(step: Parallelize) -> list[str]:
    body: list[str] = []
    root = f"_module(model, {step.fqn!r})"
    own = [c for r, c in step.plan if r == ""]
    if own:
        body.append(f"    parallelize_module({root}, _mesh(mesh, ({step.mesh_dim!r},)), {style_source(own[0])})")
    entries = [(r, c) for r, c in step.plan if r]
    if entries:
        body.append(f"    parallelize_module({root}, _mesh(mesh, ({step.mesh_dim!r},)), {{")
        body += [f"        {r!r}: {style_source(c)}," for r, c in entries]
        body.append("    })")
    for r, c in entries:
        after = STYLES[c.style].after
        if after is not None and c.parts > 1 and "." in r:
            parent = r.rsplit(".", 1)[0]
            body.append(f"    {after.rsplit('.', 1)[-1]}({root}.get_submodule({parent!r}), "
                        f"{root}.get_submodule({r!r}), {c.parts!r}, _mesh(mesh, ({step.mesh_dim!r},)).size())")
    return body


def _checkpoint(step: Checkpoint) -> list[str]:
    parent, _, child = step.fqn.rpartition(".")
    extra = ", context_fn=selective_checkpoint_context" if step.mode == "selective" else ""
    return [f"    _parent = _module(model, {parent!r})",
            f"    _parent.register_module({child!r}, checkpoint_wrapper(_parent.get_submodule({child!r}), "
            f"preserve_rng_state=False{extra}))"]


def _context_parallel(step: ContextParallel) -> list[str]:
    # Not plain torch: the exact attention over a split sequence is meshplan's.
    return ["    from meshplan.runtime.parallel.apply import install_context_parallel  # needs meshplan",
            f"    install_context_parallel(model, mesh, {step.fqns!r}, {step.mesh_dim!r}, "
            f"load_balance={step.load_balance!r}, rotate={step.rotate!r})"]


_TORCH_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32",
                 "fp64": "torch.float64"}


def _mixed_precision(mp: MixedPrecision | None) -> str:
    dt = _TORCH_DTYPES
    return "MixedPrecisionPolicy()" if mp is None else (
        f"MixedPrecisionPolicy(param_dtype={dt.get(mp.param or '', 'None')}, "
        f"reduce_dtype={dt.get(mp.reduce or '', 'None')}, output_dtype={dt.get(mp.output or '', 'None')}, "
        f"cast_forward_inputs={mp.cast_forward_inputs!r})")


def _expert_parallel(step: ExpertParallel) -> list[str]:
    # Not plain torch: token dispatch to the experts' ranks is meshplan's.
    return ["    from meshplan.runtime.parallel.experts import install_expert_parallel  # needs meshplan",
            f"    install_expert_parallel(model, mesh, {step.fqns!r}, {step.size!r}, dispatch={step.dispatch!r}, "
            f"replicas={step.replicas!r}, fsdp={step.fsdp!r}, hsdp={step.hsdp!r}, "
            f"reshard_after_forward={step.reshard_after_forward!r}, "
            f"gradient_divide_factor={step.gradient_divide_factor!r}, "
            f"mp_policy={_mixed_precision(step.mixed_precision)})"]


def _fully_shard(step: FullyShard) -> list[str]:
    mods = ", ".join(f"_module(model, {f!r})" for f in step.fqns) if step.fqns else "model"
    target = f"[{mods}]" if len(step.fqns) > 1 else mods
    policy = _mixed_precision(step.mixed_precision)
    offload = f"CPUOffloadPolicy(pin_memory={step.offload.pin_memory!r})" if step.offload else "OffloadPolicy()"
    return [f"    fully_shard({target}, mesh=_mesh(mesh, {step.mesh_dims!r}), "
            f"reshard_after_forward={step.reshard_after_forward!r}, mp_policy={policy}, "
            f"offload_policy={offload})"]


_FREEZE = ["    for _name, _param in model.named_parameters():",
           "        _param.requires_grad_(\".lora_\" in _name)  # only the adapters train"]


def _adapters(step: Adapters) -> list[str]:
    if step.quantize is not None:
        # Holding the bases as NF4 blocks that FSDP2 shards (quantised whole, split by rows)
        # is meshplan's runtime's; a torch + PEFT script cannot say it yet.
        raise ValueError("--emit python cannot write a quantized (QLoRA) base yet (the NF4 bases are "
                         "meshplan's runtime's); use --emit json, which `plan run` and meshplan.runtime apply")
    config = (f"LoraConfig(target_modules={list(step.fqns)!r}, r={step.rank!r}, lora_alpha={step.alpha!r}, "
              f"lora_dropout={step.dropout!r}, bias=\"none\")")
    body = ["    import torch",
            "    from peft import LoraConfig, inject_adapter_in_model  # needs peft",
            f"    inject_adapter_in_model({config}, model)", *_FREEZE]
    if step.dtype is not None:
        body += ["    for _name, _param in model.named_parameters():",
                 "        if \".lora_\" in _name:",
                 f"            _param.data = _param.data.to({_TORCH_DTYPES[step.dtype]})"]
    return body


def _pipeline(step: Pipeline) -> list[str]:
    # `to_python` cuts the model before any other step: a pipeline step reaching here is
    # one of size 1, which cuts nothing (as in the runtime).
    return ["    pass  # one pipeline stage: nothing to cut"]


def _entry(kind: type[S], emit: Callable[[S], list[str]]) -> tuple[type[Step], Callable[[Step], list[str]]]:
    return kind, cast(Callable[[Step], list[str]], emit)


# How the script spells each step kind: the lines of `apply()` it becomes.
EMITTERS: Mapping[type[Step], Callable[[Step], list[str]]] = dict([
    _entry(Adapters, _adapters),
    _entry(Parallelize, _parallelize),
    _entry(Checkpoint, _checkpoint),
    _entry(ContextParallel, _context_parallel),
    _entry(ExpertParallel, _expert_parallel),
    _entry(FullyShard, _fully_shard),
    _entry(Pipeline, _pipeline),
])
