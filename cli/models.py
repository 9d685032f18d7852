"""`plan models`: the presets `--model` accepts, with family and size.

The presets are `plans/models/*.json`, published configs of real models and tiny test
models; nothing is downloaded. Besides a preset, `--model` takes a local Hugging Face
directory (with its config.json) or `package.module:factory`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from .console import Terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the presets as a JSON list")


def describe(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """One preset's row: its family (model_type, architecture) and size (the config's shape)."""
    def first(*keys: str) -> Any:
        return next((values[k] for k in keys if values.get(k) is not None), None)

    heads = first("num_attention_heads", "n_head")
    experts = first("num_local_experts", "num_experts", "n_routed_experts")
    return {
        "name": name,
        "family": values.get("model_type"),
        "architecture": (values.get("architectures") or [None])[0],
        "layers": first("num_hidden_layers", "n_layer"),
        "hidden": first("hidden_size", "n_embd"),
        "heads": heads,
        "kv_heads": first("num_key_value_heads") or heads,
        "experts": experts,
        "vocab": values.get("vocab_size"),
        # The description opens with the published name and size ("Llama 3.1 8B: …").
        "title": str(values.get("_description", "")).split(":")[0].strip(),
        "description": values.get("_description", ""),
        "source": values.get("_source", ""),
    }


def run(args: argparse.Namespace, term: Terminal) -> int:
    from meshplan.planner.models import list_presets, load_preset

    rows = [describe(name, load_preset(name)) for name in list_presets()]
    if args.json:
        term.print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="model presets (--model NAME; nothing is downloaded)")
    for column, justify in (("name", "left"), ("family", "left"), ("layers", "right"), ("hidden", "right"),
                            ("heads (kv)", "right"), ("experts", "right"), ("vocab", "right"),
                            ("model", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["name"], str(r["family"]), _n(r["layers"]), _n(r["hidden"]),
                      f"{_n(r['heads'])} ({_n(r['kv_heads'])})", _n(r["experts"]), _n(r["vocab"]),
                      r["title"])
    console = term.out
    width = console.width
    if not console.is_terminal:  # piped: no row wraps
        console.width = max(width, 200)
    try:
        console.print(table)
    finally:
        console.width = width
    term.note(f"{len(rows)} presets; --model also takes a local directory holding config.json, "
              "or package.module:factory")
    return 0


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "—"
