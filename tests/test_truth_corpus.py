"""The compiler is held to the measured truth of every corpus case and shipped plan.

`tests/plans/truth.json` records, per case, the verdict measured by `tests/truth.py`
(see `tests/truth_cases.py`). Two promises:

1. For every recorded case (compile only, fast): the compiler rejects ⇔ the truth is
   not exact — except the classes of `truth_cases.ALLOWED`, named per case, where a
   rejection of an exact plan is on purpose (a pattern matching nothing, two rules on
   one module, a mistake that shows only at a size not measured, a feature the runtime
   does not have yet, hygiene). A case whose truth is `n/a` (no Program can be built:
   the language or the mesh refuses it) must be rejected.
2. The recorded truth is still the truth: re-measured on gloo ranks (one pool per world
   size for the module). CI measures `REPRESENTATIVE` (every verdict kind, the common
   mistakes); `MESHPLAN_TRUTH=all` measures every case (`bench/truth.py` does the same
   and prints a table).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.distributed import RankPool
from tests.truth_cases import ALLOWED, TruthCase, cases, compiler_verdict, measure

CASES = cases()
BY_ID = {c.id: c for c in CASES}

REPRESENTATIVE = (
    "shipped/llama@tiny-llama",
    "shipped/qwen3@tiny-qwen3",
    "shipped/phi3@tiny-phi3",
    "broken/norm_left_out_of_sp",
    "broken/partial_never_reduced",
    "broken/o_proj_forgotten",
    "broken/fused_gate_up_plain_colwise",
    "broken/pattern_typo",
    "broken/dp_without_fsdp",
    "broken/mesh_product_wrong",
    "shipped/llama_lora@tiny-llama",  # LoRA under dp 2 × tp 2 with SP: PEFT's layout
    "broken/adapters_tp_names_base_layer",  # a rule on PEFT's `base_layer` name: crash
    "shipped/llama_lora@tiny-llama:dropout",  # tp ranks draw one dropout mask: lora_A's copies agree
)


def _measured_ids() -> list[str]:
    if os.environ.get("MESHPLAN_TRUTH") == "all":
        return [c.id for c in CASES]
    return list(REPRESENTATIVE)


def test_every_corpus_case_and_shipped_plan_has_a_truth() -> None:
    from tests.test_planner_corpus import CASES as CORPUS

    recorded = {c.id for c in CASES}
    assert {f"broken/{c.file}" for c in CORPUS} | {"broken/arch_not_in_header"} <= recorded
    shipped = {c.plan.stem for c in CASES if c.id.startswith("shipped/")}
    from tests.conftest import PLANS

    missing = {p.stem for p in PLANS.glob("*.plan")} - shipped
    assert not missing, (f"shipped plans without a truth record: {sorted(missing)}; add "
                         "`shipped/<plan>@<model>` (plan, model, world, overrides, truth \"?\") to "
                         "tests/plans/truth.json and run `python bench/truth.py --unmeasured --record`")
    unmeasured = [c.id for c in CASES if c.truth not in ("exact", "wrong", "crash", "n/a")]
    assert not unmeasured, (f"{len(unmeasured)} cases have no measured truth ({', '.join(unmeasured[:5])}…): "
                            "run `python bench/truth.py --unmeasured --record`")
    assert all(c.allowed is None or c.allowed in ALLOWED for c in CASES)
    assert set(REPRESENTATIVE) <= recorded


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiler_rejects_iff_not_exact(case: TruthCase) -> None:
    if case.truth == "?":  # not measured yet: test_every_corpus_case_and_shipped_plan_has_a_truth says so
        return
    compiled = compiler_verdict(case)
    exact = case.truth == "exact"
    if case.known is not None:
        assert compiled.accepted != exact, (
            f"{case.id}: the compiler now agrees with the truth ({case.truth}): remove its `known` "
            "mark in tests/plans/truth.json")
        return
    if case.allowed is not None:
        assert exact and not compiled.accepted, (
            f"{case.id} is allowed to differ ({case.allowed}) but the compiler says "
            f"{compiled.verdict} and the truth is {case.truth}")
        return
    assert compiled.accepted == exact, (
        f"{case.id}: the compiler says {compiled.verdict}, the measured truth is {case.truth} "
        f"({case.detail})")


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[int, RankPool]]:
    made: dict[int, RankPool] = {}
    try:
        yield made
    finally:
        for pool in made.values():
            pool.close()


@pytest.mark.slow
@pytest.mark.parametrize("case_id", _measured_ids())
def test_recorded_truth_is_measured(case_id: str, pools: Any) -> None:
    case = BY_ID[case_id]
    truth = measure(case, pools)
    assert truth.truth == case.truth, f"{case_id}: recorded {case.truth}, measured {truth}"
    if truth.truth == "exact" and not case.precision:  # else within the plan's dtypes' rounding
        assert truth.error <= 1e-4
