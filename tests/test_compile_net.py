"""`plan compile`'s dry-run net (runtime.explain.net): the model run once under the Program.

StableLM's attention views q/k/v with the configured head count, so under colwise
q/k/v the model fails at its first batch (measured: tests/plans/truth.json,
`truth/stablelm_colwise_qkv`, a crash). The passes cannot see a size taken from the
config; the net runs the block on fake tensors and must reject the plan with the plan
line and the model's source line — exit 1, never 0 (accepted) or 3 (internal error).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshplan.cli.main import main
from meshplan.planner import compile_plan
from meshplan.planner.hf_import import hf_source
from meshplan.runtime.explain.net import check_runs, model_line
from tests.conftest import PLANS
from tests.distributed import RankPool, rank_pool_fixture

TRUTH = Path(__file__).resolve().parent / "plans" / "truth"


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test starts with no verified block kinds (the user's cache is not touched)."""
    from meshplan.runtime.explain import net

    monkeypatch.setattr(net, "VERIFIED", tmp_path / "verified")
    return tmp_path / "verified"


@pytest.fixture(scope="module")
def stablelm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableLM as a Hugging Face directory (config.json only: no weights)."""
    path = tmp_path_factory.mktemp("stablelm")
    hf_source("stablelm").config.save_pretrained(path)
    return path


def test_compile_rejects_a_model_that_does_not_fit(stablelm_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plan = TRUTH / "stablelm_colwise_qkv.plan"
    code = main(["compile", str(plan), "--model", str(stablelm_dir), "--world-size", "4", "-o", "/dev/null"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"{plan}:12:3: error[E601]: this model does not fit the plan" in err
    assert "model.layers.0.self_attn" in err and "is invalid for input of size" in err
    assert "modeling_stablelm.py" in err and "query_states.view(bsz, q_len, self.num_heads" in err
    assert "internal error" not in err and "Traceback" not in err


def test_the_error_names_the_plan_line_and_the_model_line() -> None:
    compiled = compile_plan(TRUTH / "stablelm_colwise_qkv.plan", hf_source("stablelm"), 4)
    [error] = check_runs(compiled)
    assert (error.code, error.span.line, error.severity) == ("E601", 12, "error")
    line = model_line(error)
    assert line is not None and line.file.endswith("modeling_stablelm.py") and line.line > 0


def test_no_dry_run_skips_the_net(stablelm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = TRUTH / "stablelm_colwise_qkv.plan"
    code = main(["compile", str(plan), "--model", str(stablelm_dir), "--world-size", "4", "-o", "/dev/null",
                 "--no-dry-run"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("plan,model,overrides", [
    ("llama.plan", "tiny-llama", ("tp=2",)),
    ("phi3.plan", "tiny-phi3", ("tp=2",)),
    ("gpt2.plan", "tiny-gpt2", ()),
])
def test_exact_plans_pass_the_net(plan: str, model: str, overrides: tuple[str, ...]) -> None:
    """Shipped plans measured exact run under the net (it must never reject a correct plan)."""
    compiled = compile_plan(PLANS / plan, model, 4, list(overrides))
    assert check_runs(compiled) == []


# ----------------------------------------------------------------------------- plan run

pool = rank_pool_fixture(2, timeout=300.0)

STABLELM_TP2 = """\
# StableLM under colwise q/k/v on 2 ranks (tp 2 only): the attention's configured head
# count does not fit the local shard.
plan stablelm_tp for StableLmForCausalLM

mesh {
  tp = 2
}

tensor_parallel on tp {
  model.layers.*.self_attn.{q,k,v}_proj : colwise
  model.layers.*.self_attn.o_proj       : rowwise
}
"""


def _plan_run(plan: str, model: str, data: str, extra: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", plan, "--model", model, "--data", data, "--seq-len", "16", "--steps", "1", *extra])
    return code, err.getvalue()


def test_plan_run_says_the_model_does_not_fit(pool: RankPool, stablelm_dir: Path, tmp_path: Path) -> None:
    """`plan run` of a plan the model does not fit: exit 1 with the plan line, on every
    rank — the first step's exception mapped to the step touching the failing module."""
    plan = tmp_path / "stablelm_tp.plan"
    plan.write_text(STABLELM_TP2, encoding="utf-8")
    results = pool.run(_plan_run, str(plan), str(stablelm_dir), "synthetic", [])
    assert all(code == 1 for code, _ in results), results
    said = results[0][1]
    assert "this model does not fit the plan" in said, said
    assert f"{plan}:10:3:" in said and "modeling_stablelm.py" in said, said
    assert "internal error" not in said and "Traceback" not in said


def test_verified_block_kinds_are_not_run_again(fresh_cache: Path) -> None:
    """A success is remembered per (config, reduced Program, length); a failure never is."""
    from meshplan.runtime.explain import net

    compiled = compile_plan(PLANS / "llama.plan", "tiny-llama", 4, ["tp=2"])
    assert check_runs(compiled) == [] and len(list(fresh_cache.iterdir())) == 1
    ran: list[int] = []
    original = net._one_step
    try:
        net._one_step = lambda c, n: ran.append(n)  # type: ignore[assignment]
        assert check_runs(compiled) == [] and ran == []  # verified: not run
        assert check_runs(compiled, seq_len=64) == [] and ran == [64]  # another length runs
    finally:
        net._one_step = original  # type: ignore[assignment]
    failing = compile_plan(TRUTH / "stablelm_colwise_qkv.plan", hf_source("stablelm"), 4)
    assert len(check_runs(failing)) == 1 and len(check_runs(failing)) == 1
    assert len(list(fresh_cache.iterdir())) == 2  # the llama kinds, the second length; no failure
