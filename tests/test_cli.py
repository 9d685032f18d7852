"""`plan check` and `plan fmt` end to end: whole stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshplan.cli.main import main

from .conftest import PLANS, ROOT, assert_golden

BROKEN = textwrap.dedent("""\
    plan broken for LlamaForCausalLM

    param tp = 4
    param unused = 3

    mesh {
      dp_shard = auto
      tp = tp
    }

    tensor_parallel on tp {
      model.layers.*.self_attn.{q,k,v}_proj : colwsie
      model.layers.*.mlp.down_proj          : rowwise(output = shard(1), outptu = replicate)
    }

    fully_shard on tp {
      mixed_precision { param = bf61 }
      unit model.layers.*
    }
    """)

MESSY = textwrap.dedent("""\
    # a plan written by hand
    plan   messy   for LlamaForCausalLM,MistralForCausalLM
    param seq_len=2048   # tokens
    mesh{
    dp_shard=auto
        tp=2}
    tensor_parallel on tp{
        model.layers.*.mlp.{gate,up}_proj:colwise
      model.layers.*.mlp.down_proj : rowwise()
    }
    fully_shard on(dp_shard){unit model.layers.*
    root}
    packing {seq_len=seq_len}
    """)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_shipped_plans_pass(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in PLANS.glob("*.plan"))
    os.chdir(ROOT)
    code, out, err = run(["check", *files], capsys)
    assert (code, out) == (0, "")
    assert err == f"{len(files)} files checked, all good\n"


def test_check_reports_every_error_sorted(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "broken.plan").write_text(BROKEN)
    code, out, err = run(["check", "broken.plan"], capsys)
    assert (code, out) == (1, "")
    assert_golden("cli/check_broken.txt", err)


def test_check_json(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "broken.plan").write_text(BROKEN)
    code, out, err = run(["check", "--json", "broken.plan"], capsys)
    assert (code, err) == (1, "")
    diagnostics = json.loads(out)
    assert [(d["line"], d["column"], d["code"]) for d in diagnostics] == [
        (4, 1, "W101"), (12, 43, "E202"), (13, 70, "E203"), (16, 1, "E412"), (16, 16, "E509"),
        (17, 29, "E204"),
    ]
    assert set(diagnostics[0]) == {"file", "line", "column", "end_line", "end_column", "severity",
                                   "code", "message", "hint", "related"}
    assert_golden("cli/check_broken.json", out)


def test_check_several_files_one_bad(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "good.plan").write_text((PLANS / "fsdp.plan").read_text())
    (workdir / "bad.plan").write_text("plan bad for X\nmesh {\n  tp = 2\n")
    code, out, err = run(["check", "good.plan", "bad.plan"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "bad.plan:3:9: error[E103]: unexpected end of file, expected `}`, a name or pattern\n"
        "  3 |   tp = 2\n"
        "    |         ^\n"
        "  hint: the `{` opened at line 2 is not closed\n"
        "2 files checked, 1 rejected (1 error)\n"
    )


def test_warnings_do_not_reject(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "w.plan").write_text("plan w for X\nparam n = 3\nmesh {\n  dp_shard = auto\n}\n")
    code, out, err = run(["check", "w.plan"], capsys)
    assert (code, out) == (0, "")
    assert err == (
        "w.plan:2:1: warning[W101]: parameter `n` is never used\n"
        "  2 | param n = 3\n"
        "    | ^^^^^^^\n"
        "1 file checked, all good (1 warning)\n"
    )


def test_check_overrides(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.chdir(ROOT)
    code, _, err = run(["check", "plans/llama.plan", "--set", "tp=4", "--set", "mesh.dp_shard=16"], capsys)
    assert (code, err) == (0, "1 file checked, all good\n")
    code, _, err = run(["check", "plans/llama.plan", "--set", "tp=four", "--set", "tq=2", "--set", "x"], capsys)
    assert code == 1
    assert err == (
        "--set tp=four: error[E302]: `tp` is an integer (declared at line 5), not a name\n"
        "--set tq=2: error[E209]: the plan has no parameter `tq`\n"
        "  hint: parameters are `tp`, `seq_len` or `microbatches`; mesh dimensions are set as `--set mesh.DIM=N` (`pp`, `dp_replicate`, `dp_shard`, `cp` or `tp`)\n"
        "--set x: error[E304]: `--set x` is not NAME=VALUE\n"
        "  hint: write e.g. `--set tp=4` or `--set mesh.dp_shard=8`\n"
        "1 file checked, 1 rejected (3 errors)\n"
    )


def test_usage_errors_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check", "nope.plan"], capsys)
    assert (code, out, err) == (2, "", "plan check: error: no such file: nope.plan\n")
    code, _, err = run(["check"], capsys)
    assert code == 2 and "the following arguments are required: FILE" in err
    code, _, err = run([], capsys)
    assert code == 2 and "COMMAND" in err
    code, _, err = run(["fmt", "nope.plan"], capsys)
    assert (code, err) == (2, "plan fmt: error: no such file: nope.plan\n")


def test_unreadable_file_is_a_diagnostic(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "latin1.plan").write_bytes(b"plan caf\xe9 for X\n")
    code, out, err = run(["check", "latin1.plan"], capsys)
    assert (code, out) == (1, "")
    # The bad byte's line and column, its line quoted with the byte replaced.
    assert err == (
        "latin1.plan:1:9: error[E104]: not UTF-8 text (invalid continuation byte at byte 8)\n"
        "  1 | plan caf\ufffd for X\n"
        "    |         ^\n"
        "  hint: save the plan as UTF-8\n"
        "1 file checked, 1 rejected (1 error)\n"
    )


def test_fmt_rewrites_in_place(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workdir / "messy.plan"
    path.write_text(MESSY)
    path.chmod(0o640)
    code, out, err = run(["fmt", "messy.plan"], capsys)
    assert (code, out, err) == (0, "", "reformatted messy.plan\n1 reformatted\n")
    assert_golden("cli/fmt_messy.plan", path.read_text())
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in workdir.iterdir()) == ["messy.plan"]  # no temp file left
    code, _, err = run(["fmt", "messy.plan"], capsys)
    assert (code, err) == (0, "1 unchanged\n")
    code, _, err = run(["check", "messy.plan"], capsys)
    assert code == 0


def test_fmt_check_changes_nothing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workdir / "messy.plan"
    path.write_text(MESSY)
    code, out, err = run(["fmt", "--check", "messy.plan"], capsys)
    assert (code, out, err) == (1, "", "would reformat messy.plan\n1 would be reformatted\n")
    assert path.read_text() == MESSY


def test_fmt_leaves_broken_files_alone(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workdir / "broken.plan"
    path.write_text("plan b for X\nmesh { tp = }\n")
    code, out, err = run(["fmt", "broken.plan"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("broken.plan:2:13: error[E101]: unexpected `}`")
    assert err.endswith("1 could not be parsed\n")
    assert path.read_text() == "plan b for X\nmesh { tp = }\n"
    assert sorted(p.name for p in workdir.iterdir()) == ["broken.plan"]


def test_fmt_stdin_to_stdout(workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("plan x for A\nmesh{tp=2}\n"))
    code, out, err = run(["fmt", "-"], capsys)
    assert (code, out, err) == (0, "plan x for A\n\nmesh {\n  tp = 2\n}\n", "")


def test_check_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from meshplan.cli.main import main\n"
        "rc = main(['check', 'plans/llama.plan', 'plans/fsdp.plan'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numba', 'networkx') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout == "0 []\n"


def test_console_script_installed() -> None:
    result = subprocess.run(["plan", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("meshplan ")


def test_quick_exit_delivers_every_output_and_exit_code(workdir: Path) -> None:
    """`plan compile` / `plan check` end their process without the interpreter's teardown
    (`cli.main.QUICK_EXIT`): piped stdout, stderr, the written file and the exit code must
    all arrive whole."""
    program = workdir / "program.json"
    ok = subprocess.run(["plan", "compile", str(PLANS / "llama.plan"), "--model", "tiny-llama", "--world-size", "8",
                         "--set", "tp=2", "--no-dry-run", "-o", str(program)], capture_output=True, text=True)
    assert ok.returncode == 0 and "compiled" in ok.stderr
    assert json.loads(program.read_text(encoding="utf-8"))["world_size"] == 8
    piped = subprocess.run(["plan", "compile", str(PLANS / "llama.plan"), "--model", "tiny-llama", "--world-size",
                            "8", "--set", "tp=2", "--no-dry-run"], capture_output=True, text=True)
    assert piped.returncode == 0 and json.loads(piped.stdout) == json.loads(program.read_text(encoding="utf-8"))
    rejected = subprocess.run(["plan", "check", str(ROOT / "tests" / "plans" / "broken" / "ep_deepseek_mla_tp.plan"),
                               "--set", "nonexistent=1"], capture_output=True, text=True)
    assert rejected.returncode == 1 and "error[" in rejected.stdout + rejected.stderr
    usage = subprocess.run(["plan", "compile", "missing.plan", "--model", "tiny-llama", "--world-size", "8"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "no such file" in usage.stderr


def test_new_output_files_get_ordinary_permissions(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from meshplan.cli.fmt import write_atomically

    umask = os.umask(0o022)
    try:
        write_atomically(workdir / "new.txt", "x\n")
    finally:
        os.umask(umask)
    assert (workdir / "new.txt").stat().st_mode & 0o777 == 0o644
