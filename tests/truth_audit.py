"""Audit of transformers' own TP plans: import, compile, measure, one family at a time.

For a config class whose model ships a TP plan: its defaults made tiny
(`planner.hf_import.tiny_config`: 2 layers, small widths), the causal-LM class (else
the base model), the plan written by `plan import hf` at tp 2, compiled at world 4
(dp_shard 2 × tp 2) with the dry-run net, as `plan compile` judges, and its truth measured by `tests/truth.py`. A row says how far
the family got: `import` (a style meshplan cannot write yet, named), `build` (the tiny
model cannot be built or traced), `compile` (accept / reject and the error codes), and
`truth` (exact / wrong / crash / n/a, with the worst tensor or the exception).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

WORLD = 4
# A tiny model above this is not measured (phi4_multimodal's towers keep their full size,
# and one process per rank would run the machine out of memory).
MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class AuditRow:
    family: str  # model_type
    architecture: str
    stage: str  # how far it got: import, build, compile, truth
    compiler: str  # accept / reject CODES / "-"
    truth: str  # exact / wrong / crash / n/a / "-"
    error: float | str
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def families_with_tp_plans() -> list[str]:
    """model_types of the installed transformers whose model ships a TP plan."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    out = []
    for model_type, class_name in CONFIG_MAPPING_NAMES.items():
        try:
            cls = getattr(transformers, class_name)
        except Exception:  # an optional dependency missing: not auditable here
            continue
        if getattr(cls, "base_model_tp_plan", None):
            out.append(model_type)
    return sorted(out)


def _row(family: str, arch: str, stage: str, start: float, compiler: str = "-", truth: str = "-",
         error: float = math.inf, detail: str = "") -> AuditRow:
    return AuditRow(family, arch, stage, compiler, truth, error if math.isfinite(error) else "inf",
                    detail.replace("\n", " ")[:300], round(time.perf_counter() - start, 2))


def audit_family(pool: Any, family: str) -> tuple[AuditRow, str | None]:
    """(row, the imported plan text or None)."""
    from meshplan.planner.hf_import import HfImportError, hf_source, import_hf
    from meshplan.planner.models import build_meta_model

    from .truth import compile_for_truth, judge_program

    start = time.perf_counter()
    try:
        source = hf_source(family)
        model = build_meta_model(source)
    except Exception as e:
        return _row(family, "?", "build", start, detail=f"{type(e).__name__}: {e}"), None
    arch = type(model).__name__
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:  # parts the tiny config does not reach (a vision or audio tower)
        return _row(family, arch, "build", start, detail=f"{size / 1e6:.0f}M parameters after shrinking the "
                    "text config: too large to measure on CPU"), None
    try:
        imported = import_hf(model)
    except HfImportError as e:
        return _row(family, arch, "import", start, detail=str(e)), None
    compiled = compile_for_truth(imported.text, source, WORLD, net=True)  # as `plan compile` judges
    if compiled.program is None:
        return _row(family, arch, "compile", start, compiled.verdict, "n/a", detail=compiled.reason), imported.text
    if not hasattr(model, "lm_head") and "CausalLM" not in arch:
        return _row(family, arch, "compile", start, compiled.verdict, "n/a",
                    detail="not a causal LM: the truth harness trains causal LMs"), imported.text
    truth = judge_program(pool, compiled.program, source)
    return _row(family, arch, "truth", start, compiled.verdict, truth.truth, truth.error, truth.detail), imported.text
