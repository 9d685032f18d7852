"""The command line against hostile or careless input: control characters, huge lines,
deep nesting, bad bytes, bad output paths, out-of-range sizes; and the first hour's
commands (`plan models`, `plan explain-code`, `--version`, `--help`).

Each test runs the real entry point (`main()`, or the installed `plan` in a subprocess)
and asserts the whole output or the exact line that matters, and the exit code.
"""

from __future__ import annotations

import io
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
