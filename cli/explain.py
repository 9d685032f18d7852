"""`plan explain FILE --model M --world-size N`: what each rank holds, how much memory,
how much traffic, and which ranks talk to which — a dry run, on a laptop.

The numbers come from `meshplan.runtime.explain` (the runtime's own apply on a meta model
over a fake process group, scaled from one block per kind); this module only renders
them: the mesh and its groups, the module tree with repeated blocks collapsed, memory
per rank class, activations per block, communication per mesh dimension; the dry run's
warnings are diagnostics on the plan lines (stderr, with the compiler's), and a model that
fails in the dry run is an error on the line whose step touched the failing module (exit 1).
`--json` prints the same numbers as JSON (and nothing else on stdout); `--html` writes them
as a page, `--svg` as a picture (the mesh, memory, activations and traffic, with legends
and scales), atomically. `--rank R` adds what rank R holds: its coordinates and groups,
the class of ranks it belongs to, that class's memory and module placements. The phases
(compile, dry run, report) are announced on stderr as they start: the dry run of a big
model takes a minute, and a silent terminal looks like a hang.

A plan with an `adapters` section is explained as it trains: frozen parameters (no
gradient, no optimizer state), the adapters, NF4 bases at their 4-bit size; the module
tree marks what is frozen, and a line under the memory table counts the values that
train. `--compare-adapters` adds a table of full fine-tuning, LoRA and QLoRA side by
side — the plan without its adapters section, with it but no `quantize`, and with its
`quantize` (else NF4's defaults) — each a dry run of its own (`--json`: under
`adapters.compare`; `--html`: the same table).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compile import add_model_arguments, compile_for_cli
from .console import Terminal
from .options import memory_size, micro_batch_arg, seq_len_arg
from .outputs import OutputError, check_outputs, write_outputs

if TYPE_CHECKING:
    from rich.console import RenderableType

    from meshplan.dsl.errors import PlanError
    from meshplan.runtime.explain.memory import Memory
    from meshplan.runtime.explain.report import Explanation, ModuleRow

DTYPE_CHOICES = ("fp32", "bf16", "fp16")
_MEMORY_ROWS = (
    ("parameters", "parameters_bytes"),
    ("gradients", "gradients_bytes"),
    ("optimizer (AdamW)", "optimizer_bytes"),
    ("buffers", "buffers_bytes"),
    ("activations", "activations_bytes"),
    ("FSDP buffers", "fsdp_buffers_bytes"),
    ("backward temporaries", "temporaries_bytes"),
)
_COLOURS = {"parameters": "#4e79a7", "gradients": "#f28e2b", "optimizer (AdamW)": "#e15759",
            "buffers": "#bab0ac", "activations": "#59a14f", "FSDP buffers": "#76b7b2",
            "backward temporaries": "#edc948"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the plan")
    add_model_arguments(p)
    p.add_argument("--micro-batch", type=micro_batch_arg, default=1, metavar="B",
                   help="sequences per rank per step (default 1); under a pipeline, per microbatch: a step "
                        "runs the plan's `microbatches` of them")
    p.add_argument("--seq-len", type=seq_len_arg, default=None, metavar="S",
                   help="tokens per sequence, a multiple of what sequence/context parallelism split it "
                        "into (default: the plan's packing seq_len or `param seq_len`)")
    p.add_argument("--param-dtype", choices=DTYPE_CHOICES, default="fp32",
                   help="dtype parameters, gradients and optimizer states are stored in (default fp32; "
                        "compute uses the plan's mixed precision)")
    p.add_argument("--gpu-memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory per GPU with its unit (80GiB, 80GB, 512MiB; GB = GiB = 2^30 bytes): "
                        "warn when a rank's estimated peak exceeds it (default: no budget)")
    p.add_argument("--fail-over-budget", action="store_true",
                   help="exit 1 when a rank's estimated peak exceeds --gpu-memory (for CI)")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="show rank R's coordinates, the ranks it talks to along each dimension, its class of "
                        "ranks, memory and module placements")
    p.add_argument("--compare-adapters", action="store_true",
                   help="for a plan with an adapters section: also print per-rank memory (rank 0's class) of full "
                        "fine-tuning (the section dropped: everything trains), LoRA (the section without "
                        "quantize) and QLoRA (its quantize, else nf4 with block sizes 64/256) side by side; "
                        "each is a dry run of its own, and a variant the dry run cannot apply (e.g. NF4 bases "
                        "under tensor parallelism) shows why")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, and nothing else")
    p.add_argument("--svg", metavar="OUT.svg", help="write the mesh and memory picture as SVG")
    p.add_argument("--html", metavar="OUT.html", help="write the mesh, memory and communication as HTML")


def run(args: argparse.Namespace, term: Terminal) -> int:
    from meshplan.dsl.errors import PlanRejected
    from meshplan.planner import Compiled
    from meshplan.planner.mesh_facts import program_sequence_multiple
    from meshplan.planner.program import Adapters
    from meshplan.runtime.explain.report import compare_adapters, explain, plan_seq_len

    from .progress import Phases

    if args.fail_over_budget and args.gpu_memory is None:
        return term.usage_error("explain", "--fail-over-budget needs --gpu-memory SIZE")
    try:  # before any work: a bad output path costs nothing
        check_outputs({"--svg": args.svg, "--html": args.html})
    except OutputError as e:
        return term.usage_error("explain", str(e))
    phases = Phases(term.note)  # stderr: never mixed into --json's stdout
    phases(f"compiling {args.file} for {args.model} on {args.world_size} ranks")
    compiled, code = compile_for_cli(args, term, "explain")
    if not isinstance(compiled, Compiled):
        return code
    program = compiled.program
    compare = getattr(args, "compare_adapters", False)
    if compare and not program.steps_of(Adapters):
        return term.usage_error("explain", "--compare-adapters: the plan has no adapters section to compare "
                                           "full fine-tuning, LoRA and QLoRA on (add `adapters { rank = 16  "
                                           "targets … }`)")
    if args.rank is not None and not 0 <= args.rank < program.world_size:
        return term.usage_error("explain", f"--rank {args.rank}: the mesh has ranks 0..{program.world_size - 1}")
    seq_len = args.seq_len or plan_seq_len(Path(args.file), args.overrides)
    if seq_len is None:
        return term.usage_error("explain", "the plan declares no sequence length (packing seq_len or "
                                           "`param seq_len`): give --seq-len")
    multiple = program_sequence_multiple(program)
    if seq_len % multiple:
        return term.usage_error("explain", f"--seq-len {seq_len} is not a multiple of {multiple}, the "
                                           "pieces sequence/context parallelism split it into on this mesh")
    try:
        ex = explain(compiled, seq_len=seq_len, micro_batch=args.micro_batch, param_dtype=args.param_dtype,
                     gpu_memory=args.gpu_memory, progress=phases)
    except PlanRejected as e:  # the model failed in the dry run: an error on the plan line
        if getattr(args, "debug", False):
            traceback.print_exception(e, file=term.err.file)
        diagnostics = [*compiled.warnings, *e.diagnostics]
        if args.json:
            term.out.file.write(json.dumps({"diagnostics": _diagnostics_json(diagnostics)}, indent=2) + "\n")
        else:
            term.diagnostics(diagnostics)
            term.note(f"plan rejected ({len(e.errors)} error{'s' if len(e.errors) != 1 else ''})")
        return 1
    diagnostics = [*compiled.warnings, *ex.diagnostics]
    if compare:
        ex.variants = compare_adapters(compiled, ex, progress=phases)
    write_outputs({Path(path): make(ex, rank=args.rank)
                   for path, make in ((args.svg, svg), (args.html, html_page)) if path})
    over = args.fail_over_budget and any(m.peak > args.gpu_memory for m in ex.memory)
    if args.json:
        data = ex.to_json()
        data["diagnostics"] = _diagnostics_json(diagnostics)
        if ex.variants:
            data["adapters"]["compare"] = [v.to_json() for v in ex.variants]
        if args.rank is not None:
            data["rank"] = _rank_json(ex, args.rank)
        term.out.file.write(json.dumps(data, indent=2) + "\n")
        return 1 if over else 0
    term.diagnostics(diagnostics)
    render(ex, term, rank=args.rank)
    for path in (args.svg, args.html):
        if path:
            term.note(f"wrote {path}")
    if over:
        term.note("plan explain: a rank's estimated peak exceeds --gpu-memory (--fail-over-budget)")
        return 1
    return 0


def _diagnostics_json(diagnostics: list[PlanError]) -> list[dict[str, object]]:
    return [d.to_json() for d in sorted(diagnostics, key=lambda d: d.sort_key())]


# --------------------------------------------------------------------------- text


def render(ex: Explanation, term: Terminal, *, rank: int | None = None) -> None:
    """Everything `plan explain` prints, through the terminal's stdout console."""
    console = term.out
    width = console.width
    if not console.is_terminal:  # piped output and golden files: no table row wraps
        console.width = max(width, 160)
    try:
        _render(ex, term, rank)
    finally:
        console.width = width


def _render(ex: Explanation, term: Terminal, rank: int | None) -> None:
    from rich.text import Text

    term.print(Text(_title(ex), style="bold"))
    term.print(f"  {_settings(ex)}")
    _section(term, "Mesh")
    _mesh(ex, term)
    _section(term, "Modules (rank 0: placements along the mesh dims, local shape)")
    term.print(f"  {_PLACEMENT_KEY}")
    _print(term, _tree(ex, ex.modules))
    _section(term, _memory_title(ex))
    _print(term, _rich_table(_memory_head(ex.memory), _memory_rows(ex, ex.memory)))
    computed = _computed(ex)
    if computed:
        term.print(f"  {computed}")
    if ex.adapted:
        term.print(f"  {_trainable(ex)}")
    if ex.pipeline is not None:
        _pipeline_section(ex, term)
    if ex.variants:
        _section(term, _VARIANTS_TITLE)
        _print(term, _rich_table(_variant_head(ex), _variant_rows(ex), right_from=1))
        for line in _variant_notes(ex):
            term.print(f"  {line}")
    if ex.blocks:
        _section(term, _blocks_title(ex))
        _print(term, _rich_table(_BLOCK_HEAD, _block_rows(ex)))
    _section(term, _comm_title(ex))
    _print(term, _rich_table(_COMM_HEAD, _comm_rows(ex)))
    term.print(f"  {_comm_total(ex)}")
    if ex.experts is not None:
        _experts_section(ex, term, ex.experts)
    term.print(f"\nattention: {_attention(ex.attention)}")
    if rank is not None:
        _rank_section(ex, term, rank)


def _title(ex: Explanation) -> str:
    p = ex.program
    return f"plan {p.plan} for {p.model} on {p.world_size} ranks"


def _settings(ex: Explanation) -> str:
    kept = ex.reduction.kept
    reduced = (f"; measured on layers {_list(kept)} of {ex.reduction.length}, scaled by layer count"
               if ex.reduction.reduced else "")
    return (f"{ex.seq_len} tokens × micro-batch {ex.micro_batch} per rank; parameters "
            f"{ex.param_dtype}, compute {ex.compute_dtype}{reduced}")


def _print(term: Terminal, renderable: RenderableType) -> None:
    term.out.print(renderable)


def _section(term: Terminal, title: str) -> None:
    from rich.text import Text

    term.print(Text(f"\n{title}", style="bold cyan"))


def _list(values: tuple[int, ...] | list[int]) -> str:
    return ", ".join(str(v) for v in values) if len(values) <= 6 else \
        ", ".join(str(v) for v in values[:5]) + f", … ({len(values)})"


def _attention(info: dict[str, Any] | None) -> str:
    if info is None:
        return "(no backend selection available in meshplan.runtime.attention)"
    if not info.get("backend"):
        return f"unknown ({info.get('error', '')})"
    text = f"{info['backend']} on CUDA ({info['kernel']}; packs as {info['format']})"
    missing = info.get("unavailable") or {}
    if missing:
        text += "; not usable here: " + "; ".join(f"{b}: {r}" for b, r in missing.items())
    return text


# A table is a header and rows of cells (strings), the same for the terminal and the page:
# the page cannot drift from what the terminal shows. A row's style applies to the terminal.
Row = tuple[list[str], str | None]
_RIGHT = ("ranks/group", "groups", "count", "group", "fwd/bwd", "bytes", "sent (ring)", "saved / layer",
          "kept / layer", "kept, all")


def _rich_table(head: list[str], rows: list[Row], right_from: int | None = None) -> RenderableType:
    """`right_from`: columns from this index on are right-aligned (figures)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, col in enumerate(head):
        right = col in _RIGHT or (i > 0 and col.startswith("rank ")) or (right_from is not None and i >= right_from)
        table.add_column(col, justify="right" if right else "left")
    for cells, style in rows:
        table.add_row(*cells, style=style)
    return table


# --------------------------------------------------------------------------- mesh


_GROUP_HEAD = ["dimension", "ranks/group", "groups", "a group is", "first groups"]


def _mesh_line(ex: Explanation) -> str:
    layout = ex.program.mesh
    dims = " × ".join(f"{n} {s}" for n, s in zip(layout.names, layout.shape, strict=True))
    return f"{dims} = {layout.world_size} ranks (row-major: the last dimension is innermost)"


def _submeshes(ex: Explanation) -> str:
    layout = ex.program.mesh
    if not layout.submeshes:
        return ""
    return "submeshes: " + " · ".join(f"{n} = {' × '.join(d)} ({layout.size(n)})" for n, d in layout.submeshes)


def _trivial(ex: Explanation) -> str:
    trivial = [g.name for g in ex.groups if g.size == 1]
    return f"size 1 (every rank alone): {', '.join(trivial)}" if trivial else ""


def _group_rows(ex: Explanation) -> list[Row]:
    layout = ex.program.mesh
    rows: list[Row] = []
    for g in ex.groups:
        if g.size == 1:
            continue
        shown = " ".join("[" + " ".join(str(r) for r in _ellipsis(group, 8)) + "]" for group in g.first)
        if g.count > len(g.first):
            shown += " …"
        rows.append(([g.name, str(g.size), str(g.count), g.pattern(layout), shown], None))
    return rows


def _mesh(ex: Explanation, term: Terminal) -> None:
    term.print(f"  {_mesh_line(ex)}")
    if _submeshes(ex):
        term.print(f"  {_submeshes(ex)}")
    _print(term, _grid(ex))
    _print(term, _rich_table(_GROUP_HEAD, _group_rows(ex)))
    if _trivial(ex):
        term.print(f"  {_trivial(ex)}")


def _ellipsis(values: tuple[int, ...], n: int) -> list[Any]:
    return list(values) if len(values) <= n else [*values[: n - 2], "…", values[-1]]


def _grid_axes(ex: Explanation) -> tuple[list[str], list[str], int, int]:
    """(row dims, column dims, rows, columns): the innermost non-trivial dimension is the
    columns, every other one the rows."""
    from meshplan.runtime.parallel.mesh import product_dims

    names, shape = product_dims(ex.program.mesh)
    real = [(n, s) for n, s in zip(names, shape, strict=True) if s > 1] or [(names[-1], shape[-1])]
    cols = [real[-1][0]]
    rows = [n for n, _ in real[:-1]]
    return rows, cols, math.prod(ex.program.mesh.size(r) for r in rows), ex.program.mesh.size(cols[0])


def _grid(ex: Explanation, max_rows: int = 8, max_cols: int = 16) -> RenderableType:
    from rich import box
    from rich.table import Table

    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    rows, cols, n_rows, n_cols = _grid_axes(ex)
    table = Table(box=box.SQUARE, show_header=True, pad_edge=True)
    table.add_column(" ".join(rows) if rows else "", justify="left", style="bold")
    shown_cols = _axis(n_cols, max_cols)
    for c in shown_cols:
        table.add_column(f"{cols[0]} {c}" if c is not None else "…", justify="right")
    for r in _axis(n_rows, max_rows):
        if r is None:
            table.add_row("…", *["…" for _ in shown_cols])
            continue
        first = r * n_cols
        coords = coordinates(layout, first)
        label = " ".join(str(coords[d]) for d in rows) if rows else ""
        table.add_row(label, *[str(first + c) if c is not None else "…" for c in shown_cols])
    return table


def _axis(n: int, limit: int) -> list[int | None]:
    if n <= limit:
        return list(range(n))
    return [*range(limit - 2), None, n - 1]


# --------------------------------------------------------------------------- one rank


def _rank_lines(ex: Explanation, rank: int) -> list[str]:
    """Rank `rank`'s coordinates, its groups, and the class of ranks it belongs to."""
    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    coords = coordinates(layout, rank)
    lines = ["coordinates: " + ", ".join(f"{n} {coords[n]}" for n in layout.names if n != "ep")]
    for g in ex.groups:
        if g.size > 1:
            group = g.group_of(layout, rank)
            lines.append(f"  along {g.name}: [{' '.join(str(r) for r in _ellipsis(group, 16))}]")
    index = ex.class_of(rank)
    if index is None:
        lines.append("class: beyond the classes measured (only the first ones are listed)")
        return lines
    c = ex.classes[index]
    how = "applied" if c.measured else "computed from the placements"
    same = "its own" if c.rank == rank else f"rank {c.rank}'s"
    lines.append(f"class: {same} (×{c.count}: ranks with the same local shapes; {how})")
    return lines


def _rank_section(ex: Explanation, term: Terminal, rank: int) -> None:
    _section(term, f"Rank {rank}")
    for line in _rank_lines(ex, rank):
        term.print(f"  {line}")
    index = ex.class_of(rank)
    if index is None:
        return
    _print(term, _rich_table(_memory_head([ex.memory[index]], rank), _memory_rows(ex, [ex.memory[index]])))
    pipe = ex.pipeline_of(index)
    if pipe is not None:
        pp_rank, stages = _rank_stages(ex, pipe, rank)
        term.print(f"  {_rank_stages_line(pipe, pp_rank, rank)}")
        _print(term, _rich_table(_STAGE_HEAD, _stage_rows(stages, len(pipe.stages)), right_from=3))
        _print(term, _rich_table(_pp_rank_head([pp_rank], rank), _pp_rank_rows(ex, pipe, [pp_rank]), right_from=1))
        term.print(f"  communication of {pipe.mesh_dim} rank {pp_rank} per training step (its stages, every "
                   "microbatch)")
        _print(term, _rich_table(_COMM_HEAD, _comm_rows(ex, pipe.ranks[pp_rank].collectives)))
    figures = ex.experts_of(rank)
    if figures is not None:
        _experts_section(ex, term, figures)
    _section(term, f"Modules (rank {rank}: placements along the mesh dims, local shape)")
    _print(term, _tree(ex, ex.modules_of(index)))


def _rank_json(ex: Explanation, rank: int) -> dict[str, Any]:
    from meshplan.runtime.explain.report import modules_json
    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    out: dict[str, Any] = {"rank": rank, "coordinates": coordinates(layout, rank),
                           "groups": {g.name: list(g.group_of(layout, rank)) for g in ex.groups}}
    index = ex.class_of(rank)
    if index is not None:
        c = ex.classes[index]
        out["class"] = {"rank": c.rank, "ranks": c.count, "measured": c.measured}
        out["memory"] = ex.memory[index].to_json()
        out["modules"] = modules_json(ex.modules_of(index))
        figures = ex.experts_of(rank)
        if figures is not None:
            out["experts"] = figures.to_json()
        pipe = ex.pipeline_of(index)
        if pipe is not None:
            pp_rank, stages = _rank_stages(ex, pipe, rank)
            out["pipeline"] = {**pipe.ranks[pp_rank].to_json(), "stages": [s.to_json() for s in stages]}
    return out


# --------------------------------------------------------------------------- pipeline


_STAGE_HEAD = ["stage", "pp rank", "layers", "parameters", "gradients", "optimizer (AdamW)",
               "activations / microbatch", "in flight", "p2p forward", "p2p backward"]
_PP_ROWS = (
    ("parameters", "parameters_bytes"),
    ("gradients", "gradients_bytes"),
    ("optimizer (AdamW)", "optimizer_bytes"),
    ("buffers", "buffers_bytes"),
    ("activations (in flight)", "activations_bytes"),
    ("FSDP buffers", "fsdp_buffers_bytes"),
    ("backward temporaries", "temporaries_bytes"),
)


def _memory_title(ex: Explanation) -> str:
    if ex.pipeline is None:
        return "Memory per rank"
    return "Memory per rank (as if one rank held every pipeline stage: each stage's share follows)"


def _pipeline_title(pipe: Any) -> str:
    per_rank = f", {pipe.virtual_stages} stages per rank" if pipe.virtual_stages > 1 else ""
    return (f"Pipeline stages ({pipe.schedule} over {pipe.mesh_dim} = {pipe.pp}{per_rank}; {pipe.microbatches} "
            f"microbatches of {pipe.micro_batch} per step; rank {pipe.rank}'s class)")


def _layer_span(layers: tuple[int, ...]) -> str:
    from meshplan.runtime.explain.report import _ranges

    return f"{_ranges(list(layers))} ({len(layers)})"


def _stage_rows(stages: list[Any], count: int) -> list[Row]:
    """One row per stage; `count`: the pipeline's stages (the last one holds the head)."""
    from meshplan.runtime.explain.sizes import human_bytes

    return [([str(s.index), str(s.pp_rank), _layer_span(s.layers) + (" + embedding" if s.index == 0 else "")
              + (" + norm, head" if s.index == count - 1 else ""),
              human_bytes(s.parameters), human_bytes(s.gradients), human_bytes(s.optimizer),
              human_bytes(s.activations_per_microbatch), str(s.in_flight), human_bytes(s.sends_forward),
              human_bytes(s.sends_backward)], None) for s in stages]


def _pp_rank_head(pp_ranks: list[int], rank: int | None = None) -> list[str]:
    label = "per pipeline rank" if rank is None else f"rank {rank}"
    return [label, *[f"pp {r}" for r in pp_ranks]]


def _pp_rank_rows(ex: Explanation, pipe: Any, pp_ranks: list[int]) -> list[Row]:
    from meshplan.runtime.explain.sizes import human_bytes

    held = [pipe.ranks[r] for r in pp_ranks]
    rows: list[Row] = [(["stages", *[", ".join(str(s) for s in h.stages) for h in held]], None)]
    rows += [([label, *[human_bytes(h.to_json()[key]) for h in held]], None) for label, key in _PP_ROWS]
    rows.append((["peak (upper bound)", *[human_bytes(h.peak) for h in held]], "bold"))
    if ex.gpu_memory is not None:
        rows.append((["--gpu-memory", *[human_bytes(ex.gpu_memory) for _ in held]], "dim"))
    rows.append((["p2p sent per step", *[human_bytes(h.sends) for h in held]], None))
    rows.append((["FSDP all-gather per step", *[human_bytes(h.fsdp_gathered) for h in held]], None))
    rows.append((["FSDP reduce-scatter per step", *[human_bytes(h.fsdp_reduced) for h in held]], None))
    rows.append((["collectives per step", *[human_bytes(sum(r.bytes for r in h.collectives)) for h in held]],
                 None))
    rows.append((["  sent (ring)", *[human_bytes(sum(r.wire_bytes for r in h.collectives)) for h in held]],
                 "dim"))
    return rows


def _pipeline_notes(pipe: Any) -> list[str]:
    from meshplan.runtime.explain.sizes import human_bytes

    return [f"bubble {100 * pipe.bubble:.1f} % of a step: (pp − 1) / ("
            + ("m" if pipe.schedule in ("gpipe", "1f1b") else "v·m") + " + pp − 1)"
            + ("; an upper bound for zero-bubble schedules" if "zero" in pipe.schedule or pipe.schedule == "zbv"
               else ""),
            f"a boundary carries per microbatch the hidden state ({human_bytes(pipe.hidden_bytes)}) and the "
            f"position ids ({human_bytes(pipe.position_bytes)}) forward, the hidden state's gradient "
            f"({human_bytes(pipe.hidden_bytes)}) backward",
            "in flight: the microbatches a stage holds at its rank's peak, walking the schedule's order of "
            "forwards and backwards; --micro-batch is the sequences of one microbatch"]


def _rank_stages(ex: Explanation, pipe: Any, rank: int) -> tuple[int, list[Any]]:
    from meshplan.runtime.explain.world import coordinates

    pp_rank = coordinates(ex.program.mesh, rank)[pipe.mesh_dim]
    return pp_rank, pipe.of_rank(pp_rank)[1]


def _rank_stages_line(pipe: Any, pp_rank: int, rank: int) -> str:
    held = pipe.ranks[pp_rank].stages
    return (f"pipeline: rank {rank} is {pipe.mesh_dim} rank {pp_rank}, holding stage"
            f"{'s' if len(held) > 1 else ''} {', '.join(str(s) for s in held)}")


def _pipeline_section(ex: Explanation, term: Terminal) -> None:
    pipe = ex.pipeline
    assert pipe is not None
    _section(term, _pipeline_title(pipe))
    _print(term, _rich_table(_STAGE_HEAD, _stage_rows(list(pipe.stages), len(pipe.stages)), right_from=3))
    _print(term, _rich_table(_pp_rank_head(list(range(pipe.pp))), _pp_rank_rows(ex, pipe, list(range(pipe.pp))),
                             right_from=1))
    for line in _pipeline_notes(pipe):
        term.print(f"  {line}")


# --------------------------------------------------------------------------- experts


_EXPERT_HEAD = ["exchange", "collective", "phase", "group", "count", "balanced", "sent", "worst", "worst sent",
                "worst received"]


def _experts_title(figures: Any) -> str:
    return f"Expert parallelism (rank {figures.rank}: its experts, and the exchanges of one step)"


def _experts_section(ex: Explanation, term: Terminal, figures: Any) -> None:
    _section(term, _experts_title(figures))
    for line in _expert_lines(ex, figures):
        term.print(f"  {line}")
    _print(term, _rich_table(_EXPERT_HEAD, _expert_rows(figures), right_from=3))


def _expert_lines(ex: Explanation, figures: Any) -> list[str]:
    """What the rank holds of the experts, and how its tokens travel (`ExpertFigures`)."""
    from meshplan.runtime.explain.sizes import human_bytes

    f, m = figures, figures.memory
    replicas = (f", its slice of the tokens {f.replicas} ranks of its ep group hold" if f.replicas > 1 else "")
    balanced, worst = f.total("balanced"), f.total("worst")
    how = "all-to-all" if f.dispatch == "alltoall" else "all-gather (dispatch = allgather: every row to every rank)"
    lines = [f"{f.local_experts} of {f.experts} experts per MoE layer × {f.layers} layers (ep {f.ep}; their own "
             f"FSDP unit over efsdp {f.efsdp}): parameters {human_bytes(m.parameters)}, gradients "
             f"{human_bytes(m.gradients)}, optimizer (AdamW) {human_bytes(m.optimizer)} — {human_bytes(m.total)} "
             "of the memory table",
             f"routes {f.routed} of its {f.tokens} tokens × top-{f.top_k} = {f.routed * f.top_k} rows of the MoE "
             f"input per layer{replicas}",
             f"per step: balanced {human_bytes(balanced.bytes)} handed to the collectives, "
             f"{human_bytes(balanced.sent)} sent to other ranks"
             + (f" ({how} {human_bytes(f.total('balanced', replicas=False).bytes)}, token-replica gathers "
                f"{human_bytes(f.total('balanced', replicas=True).bytes)})" if f.replicas > 1 else f" ({how})")]
    if f.dispatch == "alltoall":
        lines.append(f"  worst case {human_bytes(worst.bytes)} handed, {human_bytes(worst.sent)} sent, "
                     f"{human_bytes(worst.received)} received ({worst.bytes / max(balanced.bytes, 1):.1f}× the "
                     "balanced bytes)")
        lines.append("balanced: every expert gets tokens·k / E of every rank's rows; worst: every token of the ep "
                     "group routed to the experts of one rank (that rank's figures)")
    else:
        lines.append("the all-gather moves the same bytes whatever the routing")
    return lines


def _expert_rows(figures: Any) -> list[Row]:
    from meshplan.runtime.explain.sizes import human_bytes

    rows: list[Row] = []
    for x in figures.exchanges:
        b, w = x.balanced.times(x.per_step), x.worst.times(x.per_step)
        rows.append(([x.what, x.op.replace("_", "-"), x.phase, f"{x.dim} {x.group_size}", str(x.per_step),
                      human_bytes(b.bytes), human_bytes(b.sent), human_bytes(w.bytes), human_bytes(w.sent),
                      human_bytes(w.received)], None))
    b, w = figures.total("balanced"), figures.total("worst")
    rows.append((["total", "", "", "", str(sum(x.per_step for x in figures.exchanges)), human_bytes(b.bytes),
                  human_bytes(b.sent), human_bytes(w.bytes), human_bytes(w.sent), human_bytes(w.received)], "bold"))
    return rows


# --------------------------------------------------------------------------- modules


_PLACEMENT_KEY = ("R replicate · S(d) shard of dim d · _S(d, k) FSDP's shard of a tensor-parallel piece "
                  "· P partial")
_PARAM_HEAD = ["module", "parameter", "global shape", "local shape", "placements", "dtype"]


def _placement(prm: Any) -> str:
    return ", ".join(f"{d}:{_short(pl)}" for d, pl in zip(prm.mesh_dims, prm.placements, strict=True)) or "local"


def _tree(ex: Explanation, modules: list[ModuleRow]) -> RenderableType:
    from rich.text import Text
    from rich.tree import Tree

    root = Tree(Text(f"{ex.program.model} ({ex.graph.source.architecture or 'model'})"))
    blocks: dict[str, Any] = {}
    for row in modules:
        parent = root
        label = row.name
        if row.block is not None:
            if row.block not in blocks:
                blocks[row.block] = root.add(Text(row.block + (f"  ×{row.layers}" if row.layers > 1 else "")))
            parent, label = blocks[row.block], row.rel
        node = parent.add(Text(label))
        for prm in row.params:
            node.add(Text(f"{prm.name}  {_shape(prm.global_shape)} → {_shape(prm.local_shape)}  "
                          f"[{_placement(prm)}]  {_dtype(prm)}"))
    return root


def _dtype(prm: Any) -> str:
    """The storage dtype, and `frozen` for a parameter that gets no gradient."""
    return f"{prm.dtype} frozen" if prm.frozen else str(prm.dtype)


def _param_rows(modules: list[ModuleRow]) -> list[Row]:
    """The module tree flattened, one row per parameter (the page's form of the tree)."""
    return [([row.name + (f"  ×{row.layers}" if row.layers > 1 else ""), prm.name, _shape(prm.global_shape),
              _shape(prm.local_shape), f"[{_placement(prm)}]", _dtype(prm)], None)
            for row in modules for prm in row.params]


def _short(placement: str) -> str:
    return placement.replace("Replicate()", "R").replace("Shard(dim=", "S(").replace(
        "_StridedShard(dim=", "SS(").replace(", sf=", ",")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------- tables


def _memory_head(memory: list[Memory], rank: int | None = None) -> list[str]:
    if rank is not None:  # one rank's column: which class it is
        (m,) = memory
        return ["per rank", f"rank {rank}" + (f" (class of rank {m.rank}, ×{m.count})" if m.rank != rank
                                               else f" (×{m.count})")]
    return ["per rank", *[f"rank {m.rank} (×{m.count})" for m in memory]]


def _memory_rows(ex: Explanation, memory: list[Memory]) -> list[Row]:
    from meshplan.runtime.explain.sizes import human_bytes

    rows: list[Row] = [([label, *[human_bytes(m.to_json()[key]) for m in memory]], None)
                       for label, key in _MEMORY_ROWS]
    no_ac = [m.activations_no_ac for m in memory]
    if no_ac != [m.activations for m in memory]:
        rows.append((["  (activations without checkpointing)", *[human_bytes(v) for v in no_ac]], "dim"))
    rows.append((["peak (upper bound)", *[human_bytes(m.peak) for m in memory]], "bold"))
    if ex.gpu_memory is not None:
        rows.append((["--gpu-memory", *[human_bytes(ex.gpu_memory) for _ in memory]], "dim"))
    return rows


def _computed(ex: Explanation) -> str:
    computed = [c for c in ex.classes if not c.measured]
    if not computed:
        return ""
    return f"computed from the placements, not applied: {', '.join(f'rank {c.rank}' for c in computed)}"


def _trainable(ex: Explanation) -> str:
    """What trains under the plan's adapters: values of the whole model."""
    from meshplan.runtime.explain.sizes import human_count

    c = ex.parameter_counts()
    total = c.trainable + c.frozen
    share = f" ({100 * c.trainable / total:.2f} %)" if total else ""
    nf4 = f", {human_count(c.nf4)} of them held in NF4" if c.nf4 else ""
    return (f"adapters: {human_count(c.trainable)} of {human_count(total)} parameters train{share}; "
            f"{human_count(c.frozen)} frozen (no gradient, no optimizer state){nf4}")


_VARIANTS_TITLE = "Full fine-tuning, LoRA and QLoRA per rank (rank 0's class; each its own dry run)"


def _variant_head(ex: Explanation) -> list[str]:
    return ["per rank", *[v.name + (" (this plan)" if v.current else "") for v in ex.variants]]


def _variant_rows(ex: Explanation) -> list[Row]:
    from meshplan.runtime.explain.sizes import human_bytes, human_count

    def cells(value: Any) -> list[str]:
        return [value(v) if v.memory is not None and v.counts is not None else "—" for v in ex.variants]

    rows: list[Row] = [(["trainable parameters", *cells(lambda v: human_count(v.counts.trainable))], None),
                       (["frozen parameters", *cells(lambda v: human_count(v.counts.frozen))], None)]
    rows += [([label, *cells(lambda v, key=key: human_bytes(v.memory.to_json()[key]))], None)
             for label, key in _MEMORY_ROWS]
    rows.append((["peak (upper bound)", *cells(lambda v: human_bytes(v.memory.peak))], "bold"))
    if ex.gpu_memory is not None:
        rows.append((["--gpu-memory", *[human_bytes(ex.gpu_memory) for _ in ex.variants]], "dim"))
    return rows


def _variant_notes(ex: Explanation) -> list[str]:
    lines = [f"{v.name}: not measured: {v.error}" for v in ex.variants if v.error]
    return [*lines, f"full: the adapters section dropped; LoRA: without quantize; QLoRA: {_quantize_label(ex)}; "
                    "every other step as the plan says",
            "activations and backward temporaries are traced without the adapters (the same in every column; "
            "LoRA adds its rank-r products and, with dropout, a copy of each adapted module's input)"]


def _quantize_label(ex: Explanation) -> str:
    from meshplan.planner.program import Adapters, Quantize

    step = next(iter(ex.program.steps_of(Adapters)), None)
    q = step.quantize if step is not None and step.quantize is not None else Quantize()
    own = "the plan's quantize" if step is not None and step.quantize is not None else "nf4 by default"
    return f"{own} ({q.format}, {q.backend}, compute {q.compute}, blocks {q.block_size}/{q.scaler_block_size})"


_BLOCK_HEAD = ["layers", "count", "checkpoint", "saved / layer", "kept / layer", "kept, all"]


def _blocks_title(ex: Explanation) -> str:
    return (f"Activations per block ({ex.trace.seq_len if ex.trace else ex.seq_len} tokens "
            f"× {ex.micro_batch} per rank, {ex.compute_dtype})")


def _block_rows(ex: Explanation) -> list[Row]:
    from meshplan.runtime.explain.report import _ranges
    from meshplan.runtime.explain.sizes import human_bytes

    stack = ex.reduction.stack or ""
    rows: list[Row] = []
    for b in ex.blocks:
        name = f"{stack}.[{_ranges(list(b.layers))}]" if len(b.layers) > 1 else f"{stack}.{b.layers[0]}"
        rows.append(([name, str(len(b.layers)), b.mode or "none", human_bytes(b.saved), human_bytes(b.kept),
                      human_bytes(b.kept * len(b.layers))], None))
    if ex.trace is not None:
        rows.append((["outside the blocks", "", "", human_bytes(ex.trace.outside), "", ""], None))
    return rows


_COMM_HEAD = ["dimension", "source", "collective", "group", "count", "fwd/bwd", "bytes", "sent (ring)"]


def _comm_rows(ex: Explanation, rows: Any = None) -> list[Row]:
    """The communication table's rows: the Explanation's, or `rows` (a pipeline rank's)."""
    from meshplan.runtime.explain.comm import KIND_LABELS
    from meshplan.runtime.explain.sizes import human_bytes

    return [([r.dim, KIND_LABELS.get(r.kind, r.kind), r.op.replace("_", "-"), str(r.group_size), str(r.count),
              f"{r.forward}/{r.backward}", human_bytes(r.bytes), human_bytes(r.wire_bytes)], None)
            for r in (ex.comm if rows is None else rows)]


def _comm_title(ex: Explanation) -> str:
    if ex.pipeline is None:
        return "Communication per rank and training step"
    return ("Communication per rank and training step (as if one rank held every pipeline stage, for one "
            "microbatch: each pipeline rank's is under `--rank R`, its totals in the pipeline table)")


def _comm_total(ex: Explanation) -> str:
    from meshplan.runtime.explain.sizes import human_bytes

    total = sum(r.bytes for r in ex.comm)
    wire = sum(r.wire_bytes for r in ex.comm)
    return f"total {human_bytes(total)} in collectives, about {human_bytes(wire)} sent per rank (ring)"


# --------------------------------------------------------------------------- pictures


_BAR_W = 360  # pixels of the widest bar of a chart


def _scale(out: list[str], x: float, y: float, top: int, human: Any) -> float:
    """An axis under a chart: ticks at 0, ¼, ½, ¾ and the whole of `top` bytes."""
    out.append(f'<line x1="{x}" y1="{y}" x2="{x + _BAR_W}" y2="{y}" stroke="#333" stroke-width="0.8"/>')
    for i in range(5):
        tx = x + _BAR_W * i / 4
        out.append(f'<line x1="{tx:.1f}" y1="{y}" x2="{tx:.1f}" y2="{y + 4}" stroke="#333" stroke-width="0.8"/>')
        out.append(f'<text x="{tx:.1f}" y="{y + 15}" text-anchor="middle" font-size="9" fill="#555">'
                   f"{_x(human(top * i // 4))}</text>")
    return y + 24


def _bars(out: list[str], x: float, y: float, title: str, items: list[tuple[str, int, str]]) -> float:
    """A bar chart to a common scale with its axis: one bar per item, labelled with its value."""
    from meshplan.runtime.explain.sizes import human_bytes

    out.append(f'<text x="{x}" y="{y}" font-weight="bold">{_x(title)}</text>')
    y += 8
    top = max((v for _, v, _ in items), default=0) or 1
    for label, value, colour in items:
        out.append(f'<text x="{x}" y="{y + 11}" font-size="11">{_x(label)}: {_x(human_bytes(value))}</text>')
        out.append(f'<rect x="{x}" y="{y + 15}" width="{_BAR_W * value / top:.1f}" height="10" '
                   f'fill="{colour}"><title>{_x(label)}: {_x(human_bytes(value))}</title></rect>')
        y += 30
    return _scale(out, x, y + 2, top, human_bytes) + 10


def _memory_chart(ex: Explanation, out: list[str], x: float, y: float) -> float:
    """One stacked bar per class of ranks to a common scale, the axis, and a legend giving
    every part's size in every class."""
    from meshplan.runtime.explain.sizes import human_bytes

    out.append(f'<text x="{x}" y="{y}" font-weight="bold">memory per rank (peak, upper bound)</text>')
    y += 8
    top = max((m.peak for m in ex.memory), default=0) or 1
    for m in ex.memory:
        data = m.to_json()
        out.append(f'<text x="{x}" y="{y + 12}">rank {m.rank} (×{m.count}): {human_bytes(m.peak)}</text>')
        bx = float(x)
        for label, key in _MEMORY_ROWS:
            w = _BAR_W * data[key] / top
            if w > 0:
                out.append(f'<rect x="{bx:.1f}" y="{y + 18}" width="{w:.1f}" height="22" fill="{_COLOURS[label]}">'
                           f"<title>{_x(label)}: {human_bytes(data[key])}</title></rect>")
            bx += w
        y += 48
    if ex.gpu_memory:
        gx = x + _BAR_W * min(1.0, ex.gpu_memory / top)
        out.append(f'<line x1="{gx:.1f}" y1="{y - 48 * len(ex.memory) + 14}" x2="{gx:.1f}" y2="{y}" '
                   'stroke="#c00" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{gx:.1f}" y="{y + 10}" fill="#c00" text-anchor="middle">'
                   f"--gpu-memory {human_bytes(ex.gpu_memory)}</text>")
        y += 16
    y = _scale(out, x, y, top, human_bytes)
    for i, m in enumerate(ex.memory):  # the legend's columns: one per class
        out.append(f'<text x="{x + 170 + 110 * i}" y="{y + 12}" font-size="10" fill="#555">'
                   f"rank {m.rank} (×{m.count})</text>")
    y += 16
    for label, key in _MEMORY_ROWS:
        out.append(f'<rect x="{x}" y="{y + 4}" width="12" height="12" fill="{_COLOURS[label]}"/>')
        out.append(f'<text x="{x + 18}" y="{y + 14}">{_x(label)}</text>')
        for i, m in enumerate(ex.memory):
            out.append(f'<text x="{x + 170 + 110 * i}" y="{y + 14}">{human_bytes(m.to_json()[key])}</text>')
        y += 20
    if any(m.activations_no_ac != m.activations for m in ex.memory):
        out.append(f'<text x="{x + 18}" y="{y + 14}" fill="#555">(activations without checkpointing)</text>')
        for i, m in enumerate(ex.memory):
            out.append(f'<text x="{x + 170 + 110 * i}" y="{y + 14}" fill="#555">'
                       f"{human_bytes(m.activations_no_ac)}</text>")
        y += 20
    return y + 16


def _grid_svg(ex: Explanation, out: list[str], top: int, pad: int, rank: int | None) -> int:
    """The mesh grid, its legend; returns the height it takes."""
    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    rows, cols, n_rows, n_cols = _grid_axes(ex)
    row_axis, col_axis = _axis(n_rows, 8), _axis(n_cols, 16)
    cell, x0 = 34, pad + 100
    for j, c in enumerate(col_axis):
        label = f"{cols[0]} {c}" if c is not None else "…"
        out.append(f'<text x="{x0 + j * cell + cell / 2}" y="{top + cell * 0.6}" text-anchor="middle" '
                   f'font-size="10" fill="#555">{_x(label)}</text>')
    for i, r in enumerate(row_axis):
        y = top + cell * (i + 1)
        if r is None:
            out.append(f'<text x="{pad}" y="{y + cell * 0.6}">…</text>')
            continue
        coords = coordinates(layout, r * n_cols)
        label = " ".join(f"{d} {coords[d]}" for d in rows)
        out.append(f'<text x="{pad}" y="{y + cell * 0.6}" font-size="10" fill="#555">{_x(label)}</text>')
        for j, c in enumerate(col_axis):
            if c is None:
                out.append(f'<text x="{x0 + j * cell + cell / 2}" y="{y + cell * 0.6}" '
                           'text-anchor="middle">…</text>')
                continue
            here = r * n_cols + c
            stroke = ('stroke="#c00" stroke-width="2.5"' if here == rank else 'stroke="#333" stroke-width="0.5"')
            out.append(f'<rect x="{x0 + j * cell + 1}" y="{y + 1}" width="{cell - 2}" height="{cell - 2}" '
                       f'rx="4" fill="hsl({(r * 47) % 360},55%,82%)" {stroke}/>')
            out.append(f'<text x="{x0 + j * cell + cell / 2}" y="{y + cell * 0.62}" text-anchor="middle">'
                       f"{here}</text>")
    y = top + cell * (len(row_axis) + 1) + 18
    legend = [f"a cell is a rank; columns: {cols[0]}; one colour per row"
              + (f" ({' × '.join(rows)})" if rows else "")]
    if rank is not None:
        index = ex.class_of(rank)
        of = f", in the class of rank {ex.classes[index].rank} (its memory bar)" if index is not None else ""
        legend.append(f"red outline: rank {rank} (--rank){of}")
    for g in ex.groups:
        if g.size > 1:
            legend.append(f"{g.name}: {g.count} groups of {g.size}, {g.pattern(layout)}")
    for line in legend:
        out.append(f'<text x="{pad}" y="{y}" font-size="11" fill="#333">{_x(line)}</text>')
        y += 16
    return y


def svg(ex: Explanation, *, rank: int | None = None) -> str:
    """A standalone SVG: the mesh grid (ranks coloured by row, `rank` outlined) with its
    groups; memory per class of ranks as stacked bars; activations per block and
    traffic per collective as bars; every chart with its scale and legend."""
    _, _, _, n_cols = _grid_axes(ex)
    pad, top = 16, 64
    grid_w = 120 + 34 * len(_axis(n_cols, 16))
    left_w = max(grid_w, 420)
    out: list[str] = [
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{pad}" y="22" font-size="15" font-weight="bold">{_x(_title(ex))}</text>',
        f'<text x="{pad}" y="40" fill="#555">{_x(_mesh_line(ex))}</text>',
        f'<text x="{pad}" y="56" fill="#555" font-size="11">{_x(_settings(ex))}</text>',
    ]
    left_h = _grid_svg(ex, out, top, pad, rank)
    x = left_w + pad * 2
    y = _memory_chart(ex, out, x, top + 16)
    if ex.blocks:
        blocks = [(cells[0] + (f" ({cells[2]}; per layer saved {cells[3]}, kept {cells[4]}; ×{cells[1]})"
                               if cells[1] else ""), v, "#59a14f")
                  for (cells, _), v in zip(_block_rows(ex), _block_values(ex), strict=True)]
        y = _bars(out, x, y, _blocks_title(ex).replace("Activations per block", "activations kept"), blocks)
    comm = [(f"{cells[0]} {cells[2]} ({cells[1]}), {cells[4]}× ({cells[5]}), sent {cells[7]}", r.bytes, "#4e79a7")
            for (cells, _), r in zip(_comm_rows(ex), ex.comm, strict=True)]
    if comm:
        y = _bars(out, x, y, "communication per rank and training step (bytes; " + _comm_total(ex) + ")", comm)
    width, height = x + _BAR_W + 460, max(left_h, int(y)) + pad
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">')
    return "\n".join([head, *out, "</svg>"]) + "\n"


def _block_values(ex: Explanation) -> list[int]:
    """The bytes each row of the activation table stands for: a block's kept activations
    over all its layers; outside the blocks, what the trace saved there."""
    values = [b.kept * len(b.layers) for b in ex.blocks]
    return values + ([ex.trace.outside] if ex.trace is not None else [])


def html_page(ex: Explanation, *, rank: int | None = None) -> str:
    """A standalone HTML page: every table and line of the text output, and the SVG picture."""
    def table(head: list[str], rows: list[Row]) -> str:
        th = "".join(f"<th>{_x(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{_x(c)}</td>" for c in cells) + "</tr>" for cells, _ in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>\n"

    def para(*lines: str) -> str:
        return "".join(f"<p>{_x(line)}</p>\n" for line in lines if line)

    parts = [f"<h1>{_x(_title(ex))}</h1>\n", para(_settings(ex)), svg(ex, rank=rank),
             "<h2>Mesh</h2>\n", para(_mesh_line(ex), _submeshes(ex)), table(_GROUP_HEAD, _group_rows(ex)),
             para(_trivial(ex)),
             "<h2>Modules (rank 0: placements along the mesh dims, local shape)</h2>\n", para(_PLACEMENT_KEY),
             table(_PARAM_HEAD, _param_rows(ex.modules)),
             "<h2>" + _x(_memory_title(ex)) + "</h2>\n", table(_memory_head(ex.memory), _memory_rows(ex, ex.memory)),
             para(_computed(ex), _trainable(ex) if ex.adapted else "")]
    if ex.pipeline is not None:
        pipe = ex.pipeline
        parts += [f"<h2>{_x(_pipeline_title(pipe))}</h2>\n", table(_STAGE_HEAD, _stage_rows(list(pipe.stages), len(pipe.stages))),
                  table(_pp_rank_head(list(range(pipe.pp))), _pp_rank_rows(ex, pipe, list(range(pipe.pp)))),
                  para(*_pipeline_notes(pipe))]
    if ex.variants:
        parts += [f"<h2>{_x(_VARIANTS_TITLE)}</h2>\n", table(_variant_head(ex), _variant_rows(ex)),
                  para(*_variant_notes(ex))]
    if ex.blocks:
        parts += [f"<h2>{_x(_blocks_title(ex))}</h2>\n", table(_BLOCK_HEAD, _block_rows(ex))]
    parts += ["<h2>" + _x(_comm_title(ex)) + "</h2>\n", table(_COMM_HEAD, _comm_rows(ex)),
              para(_comm_total(ex)), para(f"attention: {_attention(ex.attention)}")]
    if ex.experts is not None:
        parts += [f"<h2>{_x(_experts_title(ex.experts))}</h2>\n", para(*_expert_lines(ex, ex.experts)),
                  table(_EXPERT_HEAD, _expert_rows(ex.experts))]
    if rank is not None:
        parts += [f"<h2>Rank {rank}</h2>\n", para(*_rank_lines(ex, rank))]
        index = ex.class_of(rank)
        if index is not None:
            mem = [ex.memory[index]]
            parts += [table(_memory_head(mem, rank), _memory_rows(ex, mem)),
                      f"<h3>Modules (rank {rank}: placements along the mesh dims, local shape)</h3>\n",
                      table(_PARAM_HEAD, _param_rows(ex.modules_of(index)))]
    warnings = "".join(f"<li>{_x(str(d))}</li>" for d in ex.diagnostics)
    if warnings:
        parts.append(f"<h2>Warnings</h2><ul>{warnings}</ul>\n")
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{_x(_title(ex))}</title><style>"
        "body{font-family:Helvetica,Arial,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>\n"
        + "".join(parts) + "</body></html>\n"
    )


def _x(text: str) -> str:
    return html.escape(str(text), quote=True)
