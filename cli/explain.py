"""`plan explain FILE --model M --world-size N`: what each rank holds, how much memory,
how much traffic, and which ranks talk to which — a dry run, on a laptop.

The numbers come from `meshplan.runtime.explain` (the runtime's own apply on a meta model
over a fake process group, scaled from one block per kind); this module only renders
them: the mesh and its groups, the module tree with repeated blocks collapsed, memory
per rank class, activations per block, communication per mesh dimension; the dry run's
warnings are diagnostics on the plan lines (stderr, with the compiler's), and a model that
fails in the dry run is an error on the line whose step touched the failing module (exit 1).
`--json` prints the same numbers as JSON (and nothing else on stdout); `--svg`/`--html`
write a picture of the mesh and the memory breakdown, atomically.
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
    from meshplan.runtime.explain.report import Explanation

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
                   help="sequences per rank per step (default 1)")
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
                   help="show rank R's coordinates and the ranks it talks to along each dimension")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, and nothing else")
    p.add_argument("--svg", metavar="OUT.svg", help="write the mesh and memory picture as SVG")
    p.add_argument("--html", metavar="OUT.html", help="write the mesh, memory and communication as HTML")


def run(args: argparse.Namespace, term: Terminal) -> int:
    from meshplan.dsl.errors import PlanRejected
    from meshplan.planner import Compiled
    from meshplan.planner.mesh_facts import program_sequence_multiple
    from meshplan.runtime.explain.report import explain, plan_seq_len

    if args.fail_over_budget and args.gpu_memory is None:
        return term.usage_error("explain", "--fail-over-budget needs --gpu-memory SIZE")
    try:  # before any work: a bad output path costs nothing
        check_outputs({"--svg": args.svg, "--html": args.html})
    except OutputError as e:
        return term.usage_error("explain", str(e))
    compiled, code = compile_for_cli(args, term, "explain")
    if not isinstance(compiled, Compiled):
        return code
    program = compiled.program
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
                     gpu_memory=args.gpu_memory)
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
    write_outputs({Path(path): make(ex) for path, make in ((args.svg, svg), (args.html, html_page)) if path})
    over = args.fail_over_budget and any(m.peak > args.gpu_memory for m in ex.memory)
    if args.json:
        data = ex.to_json()
        data["diagnostics"] = _diagnostics_json(diagnostics)
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

    from meshplan.runtime.explain.sizes import human_bytes

    p = ex.program
    head = Text(f"plan {p.plan} for {p.model} on {p.world_size} ranks", style="bold")
    term.print(head)
    kept = ex.reduction.kept
    reduced = (f"; measured on layers {_list(kept)} of {ex.reduction.length}, scaled by layer count"
               if ex.reduction.reduced else "")
    term.print(f"  {ex.seq_len} tokens × micro-batch {ex.micro_batch} per rank; parameters "
               f"{ex.param_dtype}, compute {ex.compute_dtype}{reduced}")
    _section(term, "Mesh")
    _mesh(ex, term, rank)
    _section(term, "Modules (rank 0: placements along the mesh dims, local shape)")
    term.print("  R replicate · S(d) shard of dim d · _S(d, k) FSDP's shard of a tensor-parallel piece "
               "· P partial")
    _print(term, _tree(ex))
    _section(term, "Memory per rank")
    _print(term, _memory_table(ex))
    computed = [c for c in ex.classes if not c.measured]
    if computed:
        term.print(f"  computed from the placements, not applied: {', '.join(f'rank {c.rank}' for c in computed)}")
    if ex.blocks:
        _section(term, f"Activations per block ({ex.trace.seq_len if ex.trace else ex.seq_len} tokens "
                       f"× {ex.micro_batch} per rank, {ex.compute_dtype})")
        _print(term, _block_table(ex))
    _section(term, "Communication per rank and training step")
    _print(term, _comm_table(ex))
    total = sum(r.bytes for r in ex.comm)
    wire = sum(r.wire_bytes for r in ex.comm)
    term.print(f"  total {human_bytes(total)} in collectives, about {human_bytes(wire)} sent per rank (ring)")
    if ex.attention is not None:
        term.print(f"\nattention: {_attention(ex.attention)}")
    else:
        term.print("\nattention: (no backend selection available in meshplan.runtime.attention)")


def _print(term: Terminal, renderable: RenderableType) -> None:
    term.out.print(renderable)


def _section(term: Terminal, title: str) -> None:
    from rich.text import Text

    term.print(Text(f"\n{title}", style="bold cyan"))


def _list(values: tuple[int, ...] | list[int]) -> str:
    return ", ".join(str(v) for v in values) if len(values) <= 6 else \
        ", ".join(str(v) for v in values[:5]) + f", … ({len(values)})"


def _attention(info: dict[str, Any]) -> str:
    if not info.get("backend"):
        return f"unknown ({info.get('error', '')})"
    text = f"{info['backend']} on CUDA ({info['kernel']}; packs as {info['format']})"
    missing = info.get("unavailable") or {}
    if missing:
        text += "; not usable here: " + "; ".join(f"{b}: {r}" for b, r in missing.items())
    return text


# --------------------------------------------------------------------------- mesh


def _mesh(ex: Explanation, term: Terminal, rank: int | None) -> None:
    from rich import box
    from rich.table import Table

    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    dims = " × ".join(f"{n} {s}" for n, s in zip(layout.names, layout.shape, strict=True))
    term.print(f"  {dims} = {layout.world_size} ranks (row-major: the last dimension is innermost)")
    if layout.submeshes:
        subs = " · ".join(f"{n} = {' × '.join(d)} ({layout.size(n)})" for n, d in layout.submeshes)
        term.print(f"  submeshes: {subs}")
    _print(term, _grid(ex))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col, justify in (("dimension", "left"), ("ranks/group", "right"), ("groups", "right"),
                         ("a group is", "left"), ("first groups", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    trivial = [g.name for g in ex.groups if g.size == 1]
    for g in ex.groups:
        if g.size == 1:
            continue
        shown = " ".join("[" + " ".join(str(r) for r in _ellipsis(group, 8)) + "]" for group in g.first)
        if g.count > len(g.first):
            shown += " …"
        table.add_row(g.name, str(g.size), str(g.count), g.pattern(layout), shown)
    _print(term, table)
    if trivial:
        term.print(f"  size 1 (every rank alone): {', '.join(trivial)}")
    if rank is not None:
        coords = coordinates(layout, rank)
        where = ", ".join(f"{n} {coords[n]}" for n in layout.names if n != "ep")
        term.print(f"  rank {rank}: {where}")
        for g in ex.groups:
            if g.size > 1:
                group = g.group_of(layout, rank)
                term.print(f"    along {g.name}: [{' '.join(str(r) for r in _ellipsis(group, 16))}]")


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


# --------------------------------------------------------------------------- modules


def _tree(ex: Explanation) -> RenderableType:
    from rich.text import Text
    from rich.tree import Tree

    root = Tree(Text(f"{ex.program.model} ({ex.graph.source.architecture or 'model'})"))
    blocks: dict[str, Any] = {}
    for row in ex.modules:
        parent = root
        label = row.name
        if row.block is not None:
            if row.block not in blocks:
                blocks[row.block] = root.add(Text(row.block + (f"  ×{row.layers}" if row.layers > 1 else "")))
            parent, label = blocks[row.block], row.rel
        node = parent.add(Text(label))
        for prm in row.params:
            placement = ", ".join(f"{d}:{_short(pl)}" for d, pl in zip(prm.mesh_dims, prm.placements,
                                                                          strict=True)) or "local"
            node.add(Text(f"{prm.name}  {_shape(prm.global_shape)} → {_shape(prm.local_shape)}  "
                          f"[{placement}]  {prm.dtype}"))
    return root


def _short(placement: str) -> str:
    return placement.replace("Replicate()", "R").replace("Shard(dim=", "S(").replace(
        "_StridedShard(dim=", "SS(").replace(", sf=", ",")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------- tables


def _memory_table(ex: Explanation) -> RenderableType:
    from rich import box
    from rich.table import Table

    from meshplan.runtime.explain.sizes import human_bytes

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("per rank")
    for m in ex.memory:
        table.add_column(f"rank {m.rank} (×{m.count})", justify="right")
    rows = [(label, [m.to_json()[key] for m in ex.memory]) for label, key in _MEMORY_ROWS]
    for label, values in rows:
        table.add_row(label, *[human_bytes(v) for v in values])
    no_ac = [m.activations_no_ac for m in ex.memory]
    if no_ac != [m.activations for m in ex.memory]:
        table.add_row("  (activations without checkpointing)", *[human_bytes(v) for v in no_ac],
                      style="dim")
    table.add_row("peak (upper bound)", *[human_bytes(m.peak) for m in ex.memory], style="bold")
    if ex.gpu_memory is not None:
        table.add_row("--gpu-memory", *[human_bytes(ex.gpu_memory) for _ in ex.memory], style="dim")
    return table


def _block_table(ex: Explanation) -> RenderableType:
    from rich import box
    from rich.table import Table

    from meshplan.runtime.explain.report import _ranges
    from meshplan.runtime.explain.sizes import human_bytes

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col, justify in (("layers", "left"), ("count", "right"), ("checkpoint", "left"),
                         ("saved / layer", "right"), ("kept / layer", "right"), ("kept, all", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    stack = ex.reduction.stack or ""
    for b in ex.blocks:
        name = f"{stack}.[{_ranges(list(b.layers))}]" if len(b.layers) > 1 else f"{stack}.{b.layers[0]}"
        table.add_row(name, str(len(b.layers)), b.mode or "none",
                      human_bytes(b.saved), human_bytes(b.kept), human_bytes(b.kept * len(b.layers)))
    if ex.trace is not None:
        table.add_row("outside the blocks", "", "", human_bytes(ex.trace.outside), "", "")
    return table


def _comm_table(ex: Explanation) -> RenderableType:
    from rich import box
    from rich.table import Table

    from meshplan.runtime.explain.comm import KIND_LABELS
    from meshplan.runtime.explain.sizes import human_bytes

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col, justify in (("dimension", "left"), ("source", "left"), ("collective", "left"),
                         ("group", "right"), ("count", "right"), ("fwd/bwd", "right"),
                         ("bytes", "right"), ("sent (ring)", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in ex.comm:
        table.add_row(r.dim, KIND_LABELS.get(r.kind, r.kind), r.op.replace("_", "-"), str(r.group_size),
                      str(r.count), f"{r.forward}/{r.backward}", human_bytes(r.bytes), human_bytes(r.wire_bytes))
    return table


def _rank_json(ex: Explanation, rank: int) -> dict[str, Any]:
    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    return {"rank": rank, "coordinates": coordinates(layout, rank),
            "groups": {g.name: list(g.group_of(layout, rank)) for g in ex.groups}}


# --------------------------------------------------------------------------- pictures


def svg(ex: Explanation) -> str:
    """A standalone SVG: the mesh grid (ranks coloured by their data-parallel group) and a
    stacked bar of each rank class's memory."""
    from meshplan.runtime.explain.sizes import human_bytes
    from meshplan.runtime.explain.world import coordinates

    layout = ex.program.mesh
    rows, cols, n_rows, n_cols = _grid_axes(ex)
    row_axis, col_axis = _axis(n_rows, 8), _axis(n_cols, 16)
    cell, pad, top = 34, 16, 56
    grid_w = 120 + cell * len(col_axis)
    grid_h = top + cell * (len(row_axis) + 1)
    bar_w, bar_h = 360, 26
    width = grid_w + pad * 2 + bar_w + 240
    height = max(grid_h + pad, top + (bar_h + 30) * len(ex.memory) + 40 + 22 * len(_MEMORY_ROWS))
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{pad}" y="22" font-size="15" font-weight="bold">{_x(ex.program.plan)} for '
        f'{_x(ex.program.model)} on {layout.world_size} ranks</text>',
        f'<text x="{pad}" y="40" fill="#555">' + _x(" × ".join(
            f"{n} {s}" for n, s in zip(layout.names, layout.shape, strict=True))) + "</text>",
    ]
    x0 = pad + 100
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
            rank = r * n_cols + c
            hue = (r * 47) % 360
            out.append(f'<rect x="{x0 + j * cell + 1}" y="{y + 1}" width="{cell - 2}" height="{cell - 2}" '
                       f'rx="4" fill="hsl({hue},55%,82%)" stroke="#333" stroke-width="0.5"/>')
            out.append(f'<text x="{x0 + j * cell + cell / 2}" y="{y + cell * 0.62}" text-anchor="middle">'
                       f"{rank}</text>")
    # Memory: one stacked bar per rank class, to a common scale.
    bx = grid_w + pad * 2
    scale = max((m.peak for m in ex.memory), default=1) or 1
    out.append(f'<text x="{bx}" y="{top - 4}" font-weight="bold">memory per rank (peak, upper bound)</text>')
    y = top + 8
    for m in ex.memory:
        data = m.to_json()
        out.append(f'<text x="{bx}" y="{y + 12}">rank {m.rank} (×{m.count}): {human_bytes(m.peak)}</text>')
        x = float(bx)
        for label, key in _MEMORY_ROWS:
            w = bar_w * data[key] / scale
            if w > 0:
                out.append(f'<rect x="{x:.1f}" y="{y + 18}" width="{w:.1f}" height="{bar_h}" '
                           f'fill="{_COLOURS[label]}"><title>{_x(label)}: {human_bytes(data[key])}</title></rect>')
            x += w
        y += bar_h + 30
    if ex.gpu_memory:
        gx = bx + bar_w * min(1.0, ex.gpu_memory / scale)
        out.append(f'<line x1="{gx:.1f}" y1="{top + 20}" x2="{gx:.1f}" y2="{y}" stroke="#c00" '
                   'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{gx:.1f}" y="{y + 12}" fill="#c00" text-anchor="middle">'
                   f"GPU {human_bytes(ex.gpu_memory)}</text>")
        y += 18
    first = ex.memory[0].to_json()
    for label, key in _MEMORY_ROWS:
        out.append(f'<rect x="{bx}" y="{y + 4}" width="12" height="12" fill="{_COLOURS[label]}"/>')
        out.append(f'<text x="{bx + 18}" y="{y + 14}">{_x(label)}: {human_bytes(first[key])}</text>')
        y += 22
    out.append("</svg>")
    return "\n".join(out) + "\n"


def html_page(ex: Explanation) -> str:
    """A standalone HTML page: the SVG picture plus the memory and communication tables."""
    from meshplan.runtime.explain.comm import KIND_LABELS
    from meshplan.runtime.explain.sizes import human_bytes

    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{_x(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{_x(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    memory = [[label, *[human_bytes(m.to_json()[key]) for m in ex.memory]] for label, key in _MEMORY_ROWS]
    memory.append(["peak (upper bound)", *[human_bytes(m.peak) for m in ex.memory]])
    comm = [[r.dim, KIND_LABELS.get(r.kind, r.kind), r.op.replace("_", "-"), str(r.group_size), str(r.count),
             human_bytes(r.bytes), human_bytes(r.wire_bytes)] for r in ex.comm]
    title = f"{ex.program.plan} for {ex.program.model} on {ex.program.world_size} ranks"
    warnings = "".join(f"<li>{_x(str(d))}</li>" for d in ex.diagnostics)
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{_x(title)}</title><style>"
        "body{font-family:Helvetica,Arial,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>\n"
        f"<h1>{_x(title)}</h1>\n<p>{ex.seq_len} tokens × micro-batch {ex.micro_batch} per rank; parameters "
        f"{ex.param_dtype}, compute {ex.compute_dtype}.</p>\n"
        + svg(ex)
        + "<h2>Memory per rank</h2>\n"
        + table(["", *[f"rank {m.rank} (×{m.count})" for m in ex.memory]], memory)
        + "\n<h2>Communication per rank and step</h2>\n"
        + table(["dimension", "source", "collective", "group", "count", "bytes", "sent (ring)"], comm)
        + (f"\n<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")
        + "\n</body></html>\n"
    )


def _x(text: str) -> str:
    return html.escape(str(text), quote=True)
