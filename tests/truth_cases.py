"""The recorded truth of every broken-plan case and every shipped plan: `tests/plans/truth.json`.

One record per case, keyed `broken/<file>` (the cases of `tests/test_planner_corpus.py`,
which name the model, world size and overrides the compiler is held to) or
`shipped/<plan>@<model>` (a plan of `plans/`, with the model, world and overrides it is
measured under). A record holds the measured verdict (`truth`, `error`, `detail`) and,
where the case cannot be measured as the compiler sees it, how it is measured instead:

- `measure.model` / `measure.config`: a tiny stand-in for a model too large to train on
  CPU, the named preset with config values changed (e.g. `tie_word_embeddings`), chosen
  so that the mistake the case is about stays the same mistake;
- `measure.world` / `measure.overrides`: a smaller world (and mesh overrides) that keeps
  the mistake (tp larger than the key/value heads at tp 4 instead of 16);
- `seq_len`: the batch length, when the case is about the sequence length (else 32);
- `measure.precision: "plan"`: the plan's own dtypes (mixed precision, the adapters'
  dtype, a 4-bit base's compute dtype) instead of fp32 throughout, for a mistake that
  is about dtypes (fp32 would make it disappear), against a one-process reference with
  the same adapters (and dtypes), exact within one unit in the last place of the plan's
  lowest dtype (`tests.truth.precision_rtol`);
- `measure.dropout: "plan"`: the adapters' own dropout instead of 0, for a mistake about
  dropout; no one process draws the ranks' masks, so the copies of every replicated
  gradient are compared with each other instead (`judge_program(replicas=True)`).

`allowed` names the class of a case where the compiler may reject although the truth is
exact (see `ALLOWED`); without it the test holds the compiler to: rejects ⇔ not exact.
`known` marks a disagreement of today's compiler with the truth that is not fixed yet,
saying what the fix needs; the test asserts it still disagrees, so that the fix shows
up as a failing test that asks for the mark to be removed.

Cases under `truth/` are plans judged by numerics only (transformers' own plans, and
mistakes today's compiler does not catch); they name model and world in the record.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "tests" / "plans" / "truth.json"
BROKEN = ROOT / "tests" / "plans" / "broken"

# Where "the compiler rejects" and "the truth is not exact" may differ, and why.
ALLOWED: dict[str, str] = {
    "matches-nothing": "a pattern that matches no module is rejected (E502): the plan says something "
                       "about the model that is not so, though the numerics do not change",
    "ambiguous": "two rules for one module (E503): the plan is ambiguous; the runtime applies the first",
    "unchecked-size": "the mistake only shows at a size the truth does not run (a sequence length or "
                      "world the rejection is about); the plan is exact on the batch measured",
    "not-implemented": "the plan asks for something the runtime does not do yet (E511): it runs without it",
    "hygiene": "a plan that trains correctly but wastes or misleads (a submodule wrapped inside its own "
               "FSDP unit, a header naming another architecture): rejected or warned on purpose",
}


@dataclass(frozen=True)
class TruthCase:
    id: str
    plan: Path
    model: str  # the model the compiler is held to
    world: int
    overrides: tuple[str, ...]
    measure_model: str
    measure_config: dict[str, Any]
    measure_world: int
    measure_overrides: tuple[str, ...]
    seq_len: int
    truth: str
    error: float
    detail: str
    allowed: str | None
    known: str | None = None  # a disagreement not fixed yet: the fix it needs
    precision: bool = False  # measured in the plan's dtypes (`measure.precision`)
    dropout: bool = False  # measured with the adapters' own dropout (`measure.dropout`)

    def record(self) -> dict[str, Any]:
        return _record(self)


def _record(case: TruthCase) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not case.id.startswith("broken/"):
        out.update(plan=str(case.plan.relative_to(ROOT)), model=case.model, world=case.world,
                   overrides=list(case.overrides))
    measure: dict[str, Any] = {}
    if case.measure_model != case.model:
        measure["model"] = case.measure_model
    if case.measure_config:
        measure["config"] = case.measure_config
    if case.measure_world != case.world:
        measure["world"] = case.measure_world
    if case.measure_overrides != case.overrides:
        measure["overrides"] = list(case.measure_overrides)
    if case.precision:
        measure["precision"] = "plan"
    if case.dropout:
        measure["dropout"] = "plan"
    if measure:
        out["measure"] = measure
    if case.seq_len != 32:
        out["seq_len"] = case.seq_len
    error: float | str = float(f"{case.error:.2g}") if case.error != float("inf") else "inf"
    out.update(truth=case.truth, error=error, detail=case.detail)
    if case.allowed:
        out["allowed"] = case.allowed
    if case.known:
        out["known"] = case.known
    return out


def load_table() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads(TABLE.read_text(encoding="utf-8"))
    return data


def write_table(records: dict[str, dict[str, Any]]) -> None:
    TABLE.write_text(json.dumps(dict(sorted(records.items())), indent=1, ensure_ascii=False) + "\n",
                     encoding="utf-8")


def cases(table: dict[str, dict[str, Any]] | None = None) -> list[TruthCase]:
    """Every recorded case: the corpus's (from its CASES) and the shipped plans'."""
    from tests.test_planner_corpus import CASES

    table = dict(load_table() if table is None else table)
    corpus = {f"broken/{c.file}": c for c in CASES}
    for key in corpus:  # a new corpus case: unmeasured until `bench/truth.py --unmeasured --record`
        table.setdefault(key, {"truth": "?"})
    out = []
    for key, rec in table.items():
        if key.startswith("broken/"):
            name = key.removeprefix("broken/")
            if name == "arch_not_in_header":
                plan, model, world, overrides = BROKEN / f"{name}.plan", "tiny-qwen2", 4, ()
            else:
                c = corpus[key]
                plan, model, world, overrides = BROKEN / f"{c.file}.plan", c.model, c.world, c.overrides
        else:
            plan, model, world = ROOT / rec["plan"], rec["model"], int(rec["world"])
            overrides = tuple(rec.get("overrides", ()))
        measure = rec.get("measure", {})
        error = rec.get("error", 0.0)
        out.append(TruthCase(
            id=key, plan=plan, model=model, world=world, overrides=overrides,
            measure_model=measure.get("model", model), measure_config=dict(measure.get("config", {})),
            measure_world=int(measure.get("world", world)),
            measure_overrides=tuple(measure.get("overrides", overrides)),
            seq_len=int(rec.get("seq_len", 32)), truth=rec.get("truth", "?"),
            error=float(error), detail=rec.get("detail", ""), allowed=rec.get("allowed"),
            known=rec.get("known"), precision=measure.get("precision") == "plan",
            dropout=measure.get("dropout") == "plan",
        ))
    return out


def measured(case: TruthCase, truth: str, error: float, detail: str) -> TruthCase:
    return dataclasses.replace(case, truth=truth, error=error, detail=detail)


@functools.cache
def model_source(model: str) -> Any:
    """A preset, a directory, or a config class / model_type (its defaults made tiny)."""
    from meshplan.planner.hf_import import hf_source

    return hf_source(model)


@functools.cache
def model_graph(model: str) -> Any:
    """One traced graph per model the compiler is held to."""
    from meshplan.planner.graph import build_graph

    return build_graph(model_source(model))


def compiler_verdict(case: TruthCase) -> Any:
    """What `plan compile` says for the case (`tests.truth.Compiled`)."""
    from tests.truth import compile_for_truth

    return compile_for_truth(case.plan, model_source(case.model), case.world, case.overrides,
                             graph=model_graph(case.model))


def source(case: TruthCase) -> Any:
    """The model the truth is measured on: a preset, or a preset with config changes."""
    src = model_source(case.measure_model)
    if not case.measure_config:
        return src
    config = src.config.__class__.from_dict({**src.config.to_dict(), **case.measure_config})
    name = f"{src.name}+" + ",".join(f"{k}={v}" for k, v in case.measure_config.items())
    return dataclasses.replace(src, config=config, name=name, spec=name,
                               values={**src.values, **case.measure_config})


def measure_overrides(case: TruthCase) -> list[str]:
    """The case's overrides, with the plan's `seq_len` set to the batch length measured
    (a Program does not depend on it; the compiler's sequence checks do)."""
    from meshplan.dsl import load

    overrides = list(case.measure_overrides)
    try:
        spec, _ = load(case.plan, overrides)
    except Exception:  # the language refuses the plan: the truth says n/a
        return overrides
    if "seq_len" in spec.params and not any(o.startswith("seq_len=") for o in overrides):
        overrides.append(f"seq_len={case.seq_len}")
    return overrides


def measure(case: TruthCase, pools: dict[int, Any]) -> Any:
    """The case's truth now (`tests.truth.Truth`), on a pool of the Program's world size
    (made on first use and kept in `pools`)."""
    import math

    from tests.distributed import RankPool
    from tests.truth import RTOL, Truth, compile_for_truth, judge_program, precision_rtol

    model = source(case)
    unchecked = compile_for_truth(case.plan, model, case.measure_world, measure_overrides(case),
                                  precision=case.precision, dropout=case.dropout)
    if unchecked.program is None:
        return Truth("n/a", unchecked.reason, math.inf)
    world = unchecked.program.world_size
    if world not in pools:
        pools[world] = RankPool(world, timeout=180.0)
    rtol = precision_rtol(unchecked.program) if case.precision else RTOL
    return judge_program(pools[world], unchecked.program, model, seq_len=case.seq_len, rtol=rtol,
                         replicas=case.dropout)
