"""`--emit python` writes every string as a literal or as escaped text: a plan path, a
module name, a pattern or a model name cannot add a statement to the script.

Each hostile script is compared with the script of a benign twin (same plan, same
structure, harmless strings): with every string constant blanked, their syntax trees
must be identical, and they must have as many lines — so nothing was added, not even
inside a comment or the docstring.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from meshplan.cli.main import main
from meshplan.dsl.errors import Span
from meshplan.planner import compile_plan
from meshplan.planner.emit import to_python
from meshplan.planner.program import (
    Checkpoint,
    ContextParallel,
    FullyShard,
    MeshLayout,
    MixedPrecision,
    Offload,
    Parallelize,
    Program,
    StyleCall,
)

from .conftest import PLANS

PAYLOAD = "import os; os.system('echo pwned')"
HOSTILE = [
    f"x\n{PAYLOAD}\n#",                          # a newline and a statement
    f'q"""; {PAYLOAD}; """',                      # ends the docstring
    f"q'''; {PAYLOAD}; '''",
    f"b\\\\\\n{PAYLOAD}\\",                       # backslashes: escapes and line continuations
    f"u\u2028{PAYLOAD}\u2029",                    # unicode line and paragraph separators
    f"c\r{PAYLOAD}\x0c\x0b\x85\x1c",              # carriage return, form feed, NEL, file separator
    f"n\x00{PAYLOAD}",                            # a NUL
    f"e\N{RIGHT-TO-LEFT OVERRIDE}{PAYLOAD}",      # bidi override (trojan source)
]
IDS = ["newline", "docstring", "quotes", "backslash", "u2028", "control", "nul", "bidi"]


def _shape(script: str) -> str:
    """The script's syntax tree with every string constant blanked."""
    tree = ast.parse(script)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""
    return ast.dump(tree)


def _assert_same_script(hostile: str, benign: str) -> None:
    compile(hostile, "<hostile>", "exec")
    assert _shape(hostile) == _shape(benign)
    assert hostile.count("\n") == benign.count("\n")
    assert len(hostile.splitlines()) == len(benign.splitlines())  # U+2028 and friends too
    names = {n.id for n in ast.walk(ast.parse(hostile)) if isinstance(n, ast.Name)}
    assert "os" not in names
    # Comments and the docstring hold nothing that could end them.
    for line in hostile.splitlines():
        assert line.isprintable() or line == "", repr(line)


def _plan_copy(directory: Path, stem: str) -> Path:
    path = directory / f"{stem}.plan"
    shutil.copyfile(PLANS / "llama.plan", path)
    return path


# A file name cannot hold a NUL: the Program test below covers that one.
PATHS = [(s, i) for s, i in zip(HOSTILE, IDS, strict=True) if "\x00" not in s]


@pytest.mark.parametrize("stem", [s for s, _ in PATHS], ids=[i for _, i in PATHS])
def test_a_hostile_plan_path_adds_nothing(tmp_path: Path, stem: str) -> None:
    overrides = ["tp=2", "mesh.cp=2"]
    benign = compile_plan(_plan_copy(tmp_path, "benign"), "tiny-llama", 8, overrides).program
    hostile = compile_plan(_plan_copy(tmp_path, stem), "tiny-llama", 8, overrides).program
    assert hostile.source.endswith(f"{stem}.plan")
    _assert_same_script(to_python(hostile), to_python(benign))


def test_the_cli_writes_the_same_script_for_a_hostile_path(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for stem in ("benign", HOSTILE[0]):
        path = _plan_copy(tmp_path, stem)
        code = main(["compile", str(path), "--model", "tiny-llama", "--world-size", "4", "--set", "tp=2",
                     "--emit", "python"])
        out, _ = capsys.readouterr()
        assert code == 0
        outputs.append(out)
    _assert_same_script(outputs[1], outputs[0])


def _program(text: str) -> Program:
    """A Program touching every string the emitter writes, each string being `text`."""
    span = Span(text, 3, 1, 3, 9)
    mesh = MeshLayout(names=("dp_shard", "cp", "tp"), shape=(2, 2, 2), submeshes=(("fsdp", ("dp_shard", "cp")),))
    calls = (
        ("", StyleCall(style="replicate")),
        (f"{text}.q", StyleCall(style="colwise", parts=2)),
        (f"{text}.a.c_attn", StyleCall(style="conv1d_colwise", parts=3)),
        (f"{text}.o", StyleCall(style="prepare_input", conversions=((text, "shard(1)", "replicate"),))),
        (f"{text}.n", StyleCall(style="sequence_parallel")),
    )
    steps = (
        Parallelize(fqn=text, mesh_dim="tp", plan=calls, span=span),
        ContextParallel(fqns=(text,), mesh_dim="cp", load_balance="headtail", rotate="ring", span=span),
        Checkpoint(fqn=f"{text}.{text}", mode="selective", span=span),
        FullyShard(fqns=(text, f"{text}.x"), mesh_dims=("fsdp",), reshard_after_forward=True, span=span,
                   mixed_precision=MixedPrecision(param="bf16", reduce="fp32"), offload=Offload(pin_memory=False)),
        FullyShard(fqns=(), mesh_dims=("fsdp",), reshard_after_forward=False, span=span),
    )
    return Program(plan=text, model=text, source=text, world_size=8, mesh=mesh, steps=steps)


@pytest.mark.parametrize("text", HOSTILE, ids=IDS)
def test_hostile_names_fqns_and_spans_add_nothing(text: str) -> None:
    hostile = _program(text)
    _assert_same_script(to_python(hostile), to_python(_program("benign")))
    # A Program read back from JSON writes the same script.
    assert to_python(Program.from_json(hostile.to_json())) == to_python(hostile)


def _json_with(path: tuple[object, ...], value: object) -> str:
    data = json.loads(_program("m").to_json())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(data)


SMUGGLED = f"1); {PAYLOAD}; ("


@pytest.mark.parametrize("path,message", [
    (("steps", 0, "plan", 1, 1, "parts"), "parts must be an integer"),
    (("steps", 0, "plan", 4, 1, "dim"), "dim must be an integer"),
    (("steps", 0, "plan", 4, 1, "local_output"), "local_output must be true or false"),
    (("steps", 0, "plan", 1, 1, "input"), "input placement"),
    (("steps", 3, "offload", "pin_memory"), "pin_memory must be true or false"),
    (("steps", 3, "mixed_precision", "cast_forward_inputs"), "cast_forward_inputs must be true or false"),
    (("steps", 3, "mixed_precision", "param"), "param dtype"),
    (("steps", 3, "reshard_after_forward"), "reshard_after_forward must be a bool or an int"),
    (("steps", 2, "mode"), "is not full or selective"),
    (("steps", 1, "rotate"), "bad load_balance/rotate"),
    (("mesh", "shape"), "sizes must be integers, got"),
    (("world_size",), "world_size must be an integer"),
    (("plan",), None),  # a string: allowed, and written as a literal
])
def test_program_json_cannot_smuggle_code(path: tuple[object, ...], message: str | None) -> None:
    value: object = [SMUGGLED, 2, 2] if path == ("mesh", "shape") else SMUGGLED
    text = _json_with(path, value)
    if message is None:
        _assert_same_script(to_python(Program.from_json(text)), to_python(_program("m")))
        return
    with pytest.raises(ValueError, match=message):
        Program.from_json(text)


def test_non_string_names_are_refused() -> None:
    text = _json_with(("steps", 2, "fqn"), ["a", "b"])
    with pytest.raises(ValueError, match="checkpoint step's fqn is not a string"):
        Program.from_json(text)
    text = _json_with(("mesh", "submeshes"), {"x = 1; import os": ["dp_shard"]})
    with pytest.raises(ValueError, match="is not a name"):
        Program.from_json(text)
