"""The command line against hostile or careless input: control characters, huge lines,
deep nesting, bad bytes, bad output paths, out-of-range sizes; and the first hour's
commands (`plan models`, `plan explain-code`, `--version`, `--help`).

Each test runs the real entry point (`main()`, or the installed `plan` in a subprocess)
and asserts the whole output or the exact line that matters, and the exit code.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshplan.cli.console import WINDOW, quote_line
from meshplan.cli.main import main


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


# ------------------------------------------------------------ quoting plan text


def test_control_characters_are_escaped_and_the_caret_stays_aligned(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ESC sequence, C1 CSI, DEL and a bidi override before the error's column.
    (workdir / "ctl.plan").write_text('plan x for A\nparam s = "\x1b[2J\x9b\x7f\u202e" ?\n', encoding="utf-8")
    code, out, err = run(["check", "ctl.plan"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "ctl.plan:2:21: error[E102]: unexpected character `?`\n"
        '  2 | param s = "\\u{1b}[2J\\u{9b}\\u{7f}\\u{202e}" ?\n'
        "    |                                           ^\n"
        "1 file checked, 1 rejected (1 error)\n"
    )
    line, caret = err.splitlines()[1:3]
    assert line[caret.index("^")] == "?"
    assert not any(ch in err for ch in "\x1b\x9b\x7f\u202e")


def test_the_offending_control_character_is_escaped_under_its_caret(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "esc.plan").write_text("plan x for A\nparam \x1b[31mred = 3\n", encoding="utf-8")
    code, _, err = run(["check", "esc.plan"], capsys)
    assert code == 1
    assert err.splitlines()[1:3] == ["  2 | param \\u{1b}[31mred = 3", "    |       ^^^^^^"]


def test_control_characters_in_names_and_messages_are_escaped(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A file name is shown too; so is the `--set` text in a message.
    code, _, err = run(["check", "no\x1bsuch.plan"], capsys)
    assert (code, err) == (2, "plan check: error: no such file: no\\u{1b}such.plan\n")


def test_a_megabyte_line_prints_a_bounded_window(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "long.plan").write_text("plan x for A\nparam y = " + "a" * 1_000_000 + " ?\n")
    code, _, err = run(["check", "long.plan"], capsys)
    assert code == 1
    assert len(err) < 2 * WINDOW + 400
    head, line, caret = err.splitlines()[:3]
    assert head == "long.plan:2:1000012: error[E102]: unexpected character `?`"
    assert line.startswith("  2 | …aaa") and line.endswith("a ?")
    assert line[caret.index("^")] == "?"


def test_a_megabyte_name_is_cut_in_the_message(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "name.plan").write_text("plan x for A\nparam " + "1" * 10 + "b" * 1_000_000 + " = 3\n")
    code, out, err = run(["check", "name.plan"], capsys)
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == (
        "name.plan:2:7: error[E101]: expected a parameter name, found `" + "1" * 10 + "b" * 50 + "…`")
    assert len(err) < 2 * WINDOW + 600


@pytest.mark.parametrize(("line", "start", "end", "expected"), [
    ("abc", 1, 2, ("abc", 1, 1)),
    ("a\tb", 2, 3, ("a b", 2, 1)),
    ("中文x", 2, 3, ("中文x", 4, 1)),           # wide characters take two columns
    ("\x1bx", 0, 1, ("\\u{1b}x", 0, 6)),        # the escape is what the caret covers
    ("x" * 300, 100, 101, ("…" + "x" * WINDOW + "…", 41, 1)),
    ("x" * 300, 250, 251, ("…" + "x" * WINDOW, 71, 1)),       # the window fills leftwards
    ("x" * 300, 0, 300, ("x" * WINDOW + "…", 0, WINDOW)),
])
def test_quote_line(line: str, start: int, end: int, expected: tuple[str, int, int]) -> None:
    text, offset, width = quote_line(line, start, end)
    assert (text, offset, width) == expected


# ------------------------------------------------------------ nesting and bytes


@pytest.mark.parametrize(("body", "column"), [
    ("param x = " + "f(" * 500 + ")" * 500, 76),
    ("packing " + "{ a " * 500 + "}" * 500, 137),
    ("param x = " + "f(" * 100_000, 76),
])
def test_deep_nesting_is_a_plan_error_not_a_recursion_error(
        workdir: Path, capsys: pytest.CaptureFixture[str], body: str, column: int) -> None:
    (workdir / "deep.plan").write_text("plan x for A\n" + body + "\n")
    for command in ("check", "fmt"):
        code, out, err = run([command, "deep.plan"], capsys)
        assert (code, out) == (1, "")
        assert err.splitlines()[0].startswith(f"deep.plan:2:{column}: error[E101]: ")
        assert "nested more than 32 levels deep" in err
        assert "RecursionError" not in err and "internal error" not in err


def test_nesting_up_to_the_limit_is_parsed(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "ok.plan").write_text("plan x for A\nparam x = " + "f(" * 32 + ")" * 32 + "\n")
    code, out, err = run(["check", "ok.plan"], capsys)
    assert (code, out) == (0, "")  # parses; the param is only unused
    assert err.splitlines()[0] == "ok.plan:2:1: warning[W101]: parameter `x` is never used"


def test_invalid_utf8_on_stdin_names_stdin_line_and_byte(
        workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"plan x for A\nparam y = 3  # \xff\xfe\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(["fmt", "-"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "<stdin>:2:16: error[E104]: not UTF-8 text (invalid start byte at byte 28)\n"
        "  2 | param y = 3  # \ufffd\ufffd\n"
        "    |                ^\n"
        "  hint: save the plan as UTF-8\n"
    )


def test_invalid_utf8_in_a_file_through_the_installed_command(workdir: Path) -> None:
    (workdir / "bad.plan").write_bytes(b"plan x for A\n\nparam \xc3( = 1\n")
    for command in ("check", "fmt"):
        result = subprocess.run(["plan", command, "bad.plan"], capture_output=True, text=True)
        assert result.returncode == 1
        assert result.stderr.splitlines()[0] == \
            "bad.plan:3:7: error[E104]: not UTF-8 text (invalid continuation byte at byte 20)"
    assert (workdir / "bad.plan").read_bytes() == b"plan x for A\n\nparam \xc3( = 1\n"


# ------------------------------------------------------------ output paths

LLAMA = "plans/llama.plan"


@pytest.fixture
def plan_in_workdir(workdir: Path) -> Path:
    from .conftest import PLANS

    (workdir / "plans").mkdir()
    (workdir / LLAMA).write_text((PLANS / "llama.plan").read_text())
    return workdir


def _read_only_directory(tmp: Path) -> Path:
    # chmod stops everyone but root; for root, sysfs refuses new files all the same.
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


@pytest.mark.parametrize(("output", "message"), [
    ("missing/program.json", "-o missing/program.json: the directory missing does not exist"),
    ("plans", "-o plans: is a directory; give a file name"),
    ("out/", "-o out/: names a directory, not a file"),
    ("plans/llama.plan/x.json", "-o plans/llama.plan/x.json: plans/llama.plan is not a directory"),
])
def test_compile_refuses_a_bad_output_before_any_work(
        plan_in_workdir: Path, capsys: pytest.CaptureFixture[str], output: str, message: str) -> None:
    before = sorted(p.name for p in plan_in_workdir.rglob("*"))
    code, out, err = run(["compile", LLAMA, "--model", "tiny-llama", "--world-size", "4", "-o", output], capsys)
    assert (code, out, err) == (2, "", f"plan compile: error: {message}\n")
    assert sorted(p.name for p in plan_in_workdir.rglob("*")) == before


def test_compile_refuses_a_read_only_directory(plan_in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = _read_only_directory(plan_in_workdir) / "program.json"
    code, out, err = run(["compile", LLAMA, "--model", "tiny-llama", "--world-size", "4", "-o", str(target)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"plan compile: error: -o {target}: cannot write in {target.parent}: ")
    assert not target.exists()


def test_compile_to_dev_null_writes_the_stream_and_keeps_the_device(
        plan_in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import stat

    code, out, err = run(["compile", LLAMA, "--model", "tiny-llama", "--world-size", "4", "--set", "tp=2",
                          "-o", "/dev/null"], capsys)
    assert (code, out) == (0, ""), err
    assert err.splitlines()[-1].endswith("→ /dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_explain_with_one_bad_output_writes_none(plan_in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", LLAMA, "--model", "tiny-llama", "--world-size", "4", "--svg", "mesh.svg"]
    code, out, err = run([*argv, "--html", "nowhere/page.html"], capsys)
    assert (code, out, err) == (2, "", "plan explain: error: --html nowhere/page.html: the directory nowhere "
                                       "does not exist\n")
    code, _, err = run([*argv, "--html", "./mesh.svg"], capsys)
    assert (code, err) == (2, "plan explain: error: --html ./mesh.svg: the same file as --svg mesh.svg\n")
    assert not (plan_in_workdir / "mesh.svg").exists()


def test_several_outputs_are_staged_before_any_is_moved(workdir: Path) -> None:
    from meshplan.cli.outputs import write_outputs

    (workdir / "a.txt").write_text("old\n")
    with pytest.raises(FileNotFoundError):
        write_outputs({workdir / "a.txt": "new\n", workdir / "missing" / "b.txt": "b\n"})
    assert (workdir / "a.txt").read_text() == "old\n"
    assert sorted(p.name for p in workdir.iterdir()) == ["a.txt"]  # no temporary file left


# ------------------------------------------------------------ sizes and ranges


@pytest.mark.parametrize(("text", "expected"), [
    ("80GiB", 80 * 2**30), ("80GB", 80 * 2**30), ("512MiB", 512 * 2**20), ("1.5 TiB", 3 * 2**39),
])
def test_memory_sizes_take_units(text: str, expected: int) -> None:
    from meshplan.cli.options import memory_size

    assert memory_size(text) == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpu-memory", "80"], "argument --gpu-memory: '80' has no unit: write e.g. 80GiB or 80MiB"),
    (["--gpu-memory", "80XB"], "argument --gpu-memory: unknown unit 'XB'"),
    (["--seq-len", str(10**12)], "argument --seq-len: 1000000000000 is out of range: expected 1 to 16,777,216"),
    (["--seq-len", "0"], "argument --seq-len: 0 is out of range"),
    (["--world-size", str(10**9)], "argument --world-size: 1000000000 is out of range: expected 1 to 1,048,576"),
])
def test_explain_refuses_bad_sizes_as_usage_errors(
        plan_in_workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    base = ["explain", LLAMA, "--model", "tiny-llama", "--world-size", "4"]
    code, out, err = run([*base, *argv], capsys)
    assert (code, out) == (2, "")
    assert message in err.splitlines()[-1]
    assert "Traceback" not in err


def test_fail_over_budget_needs_a_budget(plan_in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["explain", LLAMA, "--model", "tiny-llama", "--world-size", "4", "--fail-over-budget"],
                       capsys)
    assert (code, err) == (2, "plan explain: error: --fail-over-budget needs --gpu-memory SIZE\n")


@pytest.mark.slow
def test_explain_seq_len_and_budget(plan_in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["explain", LLAMA, "--model", "tiny-llama", "--world-size", "4", "--set", "tp=2"]
    code, out, err = run([*base, "--seq-len", "7"], capsys)
    assert (code, out) == (2, "")
    # After the compile phase's progress line, the usage error alone.
    assert err.splitlines()[-1] == ("plan explain: error: --seq-len 7 is not a multiple of 2, the pieces "
                                    "sequence/context parallelism split it into on this mesh")
    assert err.splitlines()[0].endswith(f"compiling {LLAMA} for tiny-llama on 4 ranks …")
    code, out, err = run([*base, "--seq-len", "64", "--gpu-memory", "16KiB", "--fail-over-budget"], capsys)
    assert code == 1
    assert "exceeds --gpu-memory 16.0 KiB" in err
    assert err.splitlines()[-1] == "plan explain: a rank's estimated peak exceeds --gpu-memory (--fail-over-budget)"
    code, out, err = run([*base, "--seq-len", "64", "--gpu-memory", "80GiB", "--fail-over-budget", "--json"],
                         capsys)
    assert code == 0, err
    assert json.loads(out)["memory"]


# ------------------------------------------------------------ plan pack


@pytest.mark.parametrize("count", [10**12, 10**23])
def test_pack_refuses_huge_histograms_before_allocating(
        workdir: Path, capsys: pytest.CaptureFixture[str], count: int) -> None:
    (workdir / "h.json").write_text(json.dumps({"counts": [count]}))
    code, out, err = run(["pack", "h.json", "--seq-len", "8"], capsys)
    assert (code, out) == (1, "")
    assert err == (f"plan pack: h.json: the histogram holds {count:,} sequences; at most 1,073,741,824 "
                   "can be expanded (8 GiB of lengths)\n")


def test_pack_refuses_a_billion_ranks(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "h.json").write_text(json.dumps({"counts": [3, 5]}))
    code, _, err = run(["pack", "h.json", "--seq-len", "8", "--dp", str(10**9)], capsys)
    assert code == 2
    assert err.splitlines()[-1] == ("plan pack: error: argument --dp: 1000000000 is out of range: "
                                    "expected 1 to 65,536 (data-parallel ranks)")


def test_pack_speaks_in_options_and_counts_right(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "h.json").write_text(json.dumps({"counts": [3, 5, 2]}))
    code, out, err = run(["pack", "h.json", "--seq-len", "2"], capsys)
    assert (code, out) == (1, "")
    assert err == ("plan pack: 2 sequences are longer than --seq-len 2 (longest: 3); raise --seq-len or "
                   "choose --overlong drop, truncate or split\n")
    (workdir / "one.json").write_text(json.dumps({"counts": [0, 1]}))
    code, out, err = run(["pack", "one.json", "--seq-len", "4", "--dp", "2"], capsys)
    assert (code, err) == (0, "")
    assert [line.split("│")[2].strip() for line in out.splitlines() if line.startswith("│ gap to L2 ")] == \
        ["0 bins (0.00 %)"]
    assert "(+1 empty bin)" in out and "empty bins" not in out
    assert "│ time (after JIT warm-up)" in out


# ------------------------------------------------------------ models, version, help, codes


def test_models_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    from meshplan.planner.models import list_presets

    code, out, err = run(["models", "--json"], capsys)
    assert (code, err) == (0, "")
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(list_presets())
    llama = rows["llama-3.1-8b"]
    assert (llama["family"], llama["layers"], llama["hidden"], llama["heads"], llama["kv_heads"],
            llama["vocab"], llama["title"]) == ("llama", 32, 4096, 32, 8, 128256, "Llama 3.1 8B")
    code, out, err = run(["models"], capsys)
    assert code == 0
    assert any(line.startswith("│ llama-3.1-8b ") and "│ Llama 3.1 8B" in line for line in out.splitlines())
    assert err.startswith(f"{len(rows)} presets; --model also takes a local directory")


@pytest.mark.parametrize(("model", "tail"), [
    ("meta-llama/Llama-3.1-8B", "the preset 'llama-3.1-8b' holds this model's published config "
                                "(--model llama-3.1-8b)"),
    ("someone/some-model", "pass a preset name (`plan models` lists them), a local directory holding the "
                           "model's config.json (weights are optional), or package.module:factory"),
])
def test_a_hub_id_says_nothing_is_downloaded(
        plan_in_workdir: Path, capsys: pytest.CaptureFixture[str], model: str, tail: str) -> None:
    code, out, err = run(["compile", LLAMA, "--model", model, "--world-size", "8"], capsys)
    assert (code, out) == (2, "")
    assert err == (f"plan compile: error: --model {model}: '{model}' looks like a Hugging Face Hub id and "
                   f"is not a local directory; meshplan downloads nothing: {tail}\n")


@pytest.mark.parametrize(("key", "value"), [("vocab_size", 0), ("num_attention_heads", -4), ("hidden_size", 1.5)])
def test_a_config_with_a_non_positive_size_is_rejected(
        plan_in_workdir: Path, capsys: pytest.CaptureFixture[str], key: str, value: object) -> None:
    from .conftest import PLANS

    config = json.loads((PLANS / "models" / "tiny-llama.json").read_text())
    config[key] = value
    (plan_in_workdir / "bad-model").mkdir()
    (plan_in_workdir / "bad-model" / "config.json").write_text(json.dumps(config))
    code, out, err = run(["compile", LLAMA, "--model", "bad-model", "--world-size", "4", "--set", "tp=2"],
                         capsys)
    assert (code, out) == (1, "")
    assert err == (f"plan compile: error: --model bad-model: bad-model/config.json: `{key}` is "
                   f"{json.dumps(value)}; it must be a positive integer\n")


def test_version_is_pyproject_s() -> None:
    import tomllib

    import meshplan.dsl

    from .conftest import ROOT

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert meshplan.dsl.__version__ == version
    result = subprocess.run(["plan", "--version"], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, f"meshplan {version}\n")


def test_help_gives_every_option_a_text_and_its_default() -> None:
    import argparse

    from meshplan.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "exit codes: 0 ok, 1 plan rejected" in parser.format_help()
    for name, command in commands.choices.items():
        text = command.format_help()
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (name, action.option_strings or action.dest)
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if action.option_strings and shown:
                assert "default" in action.help or f"(default: {action.default})" in text, (name, action.dest)
    explain = commands.choices["explain"].format_help()
    assert "80GiB" in " ".join(explain.split()) and "tokens per sequence" in " ".join(explain.split())


def test_every_code_has_an_explanation() -> None:
    import re

    from meshplan.dsl.errors import CATALOGUE
    from meshplan.dsl.explanations import EXPLANATIONS

    from .conftest import ROOT

    assert set(EXPLANATIONS) == set(CATALOGUE)
    for code, page in EXPLANATIONS.items():
        assert "Example" in page and "Fix:" in page, code
    # Every code the planner and runtime emit is catalogued (PlanError refuses others) and so explained.
    emitted = {m for d in ("planner", "runtime", "dsl", "cli") for f in (ROOT / d).rglob("*.py")
               for m in re.findall(r'"([EW][0-9]{3})"', f.read_text())}
    assert emitted <= set(EXPLANATIONS)


def test_explain_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain-code", "e506"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("E506: layout mismatch\n\nLayouts do not flow")
    assert "\nExample:" in out and "\nFix:" in out
    code, out, err = run(["explain-code", "E5O6"], capsys)
    assert (code, out) == (2, "")
    assert err == "plan explain-code: error: no diagnostic code 'E5O6'; did you mean `E506`?\n"
    code, out, _ = run(["explain-code", "--list"], capsys)
    assert code == 0 and "E104  file cannot be read\n" in out


def test_import_checks_its_output_before_building_the_model(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["import", "hf", "llama", "-o", "nowhere/llama.plan"], capsys)
    assert (code, out, err) == (2, "", "plan import hf: error: -o nowhere/llama.plan: the directory nowhere "
                                       "does not exist\n")


def _examples() -> list[tuple[str, str]]:
    import re

    from meshplan.dsl.explanations import EXPLANATIONS

    out = []
    for code, page in EXPLANATIONS.items():
        m = re.search(r"Example:\n\n((?:    .*\n|\n)+)", page)
        if m and code[:2] in ("E1", "E2", "E3", "E4", "W1"):
            out.append((code, "\n".join(line[4:] for line in m.group(1).rstrip().split("\n")) + "\n"))
    return out


@pytest.mark.parametrize(("code", "example"), _examples(), ids=[c for c, _ in _examples()])
def test_each_model_free_example_raises_its_code(
        code: str, example: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from meshplan.dsl import check, parse
    from meshplan.dsl.errors import PlanRejected

    from .conftest import ROOT

    if example.startswith("plan check "):  # a command line: run it
        monkeypatch.chdir(ROOT)
        _, _, err = run(example.split()[1:], capsys)
        assert f"[{code}]" in err
        return
    try:
        codes = [d.code for d in check(parse("plan x for LlamaForCausalLM\n" + example, "x.plan")).diagnostics]
    except PlanRejected as e:
        codes = [d.code for d in e.diagnostics]
    assert code in codes, (example, codes)
