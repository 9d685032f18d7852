"""Golden diagnostics for the mistakes people really make in plan files.

Each case is a small plan text (and, for `--set`, the overrides given on the command
line). The test runs `parse` and then `check`, exactly as `plan check` does, and
asserts every diagnostic reported: its code, line, column, full message and hint, in
the order the CLI prints them. Diagnostics about a `--set` have no plan line: their
span is line 0 of the pseudo-file `--set NAME=VALUE`.

Cases where the message, the hint or the column is wrong today are not here: they are
listed in the report that accompanied this file, to be fixed in `dsl/` first.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pytest

from meshplan.dsl import PlanError, PlanRejected, check, parse
from meshplan.dsl.errors import CATALOGUE


def diagnose(text: str, overrides: tuple[str, ...] | list[str] = ()) -> list[PlanError]:
    """What `plan check` reports for a plan text: the syntax errors, or the checker's findings."""
    try:
        tree = parse(text)
    except PlanRejected as e:
        return list(e.diagnostics)
    return list(check(tree, overrides).diagnostics)


@dataclass(frozen=True)
class E:
    """One expected diagnostic."""

    code: str
    line: int
    column: int
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    expected: list[E]
    overrides: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return textwrap.dedent(self.source)


CASES = [
    Case(
        "missing-closing-brace-at-eof",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
        """,
        [
            E("E103", 7, 17, "unexpected end of file, expected `}`, a name or pattern",
              "the `{` opened at line 6 is not closed"),
        ],
    ),
    Case(
        "unclosed-nested-item-body",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          unit model.layers.* {
        """,
        [
            E("E103", 7, 24, "unexpected end of file, expected `}`, a name or pattern",
              "the `{` opened at line 7 is not closed"),
        ],
    ),
    Case(
        "unterminated-style-parens",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(output = shard(1)
        }
        """,
        [
            E("E101", 7, 38, "unexpected end of line, expected `)`, `,`"),
        ],
    ),
    Case(
        "doubled-equals",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = = 4096
        }
        """,
        [
            E("E101", 7, 13, "unexpected `=`, expected a value"),
        ],
    ),
    Case(
        "colon-instead-of-equals-in-mesh",
        """\
        plan p for M
        mesh {
          tp: 2
        }
        """,
        [
            E("E101", 3, 5, "unexpected `:`, expected `=`"),
        ],
    ),
    Case(
        "param-without-equals",
        """\
        plan p for M
        param tp 4
        """,
        [
            E("E101", 2, 10, "unexpected `4`, expected `=`"),
        ],
    ),
    Case(
        "single-quoted-string",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
          format = 'varlen'
        }
        """,
        [
            E("E102", 8, 12, "unexpected character `'`", "strings are written in double quotes on one line"),
        ],
    ),
    Case(
        "unterminated-double-quoted-string",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
          format = "varlen
        }
        """,
        [
            E("E102", 8, 12, 'unexpected character `"`', "strings are written in double quotes on one line"),
        ],
    ),
    Case(
        "unexpected-character",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096 $
        }
        """,
        [
            E("E102", 7, 18, "unexpected character `$`"),
        ],
    ),
    Case(
        "header-without-for",
        """\
        plan llama
        """,
        [
            E("E101", 1, 11, "unexpected end of line, expected `for`"),
        ],
    ),
    Case(
        "stray-closing-brace",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
        }
        }
        """,
        [
            E("E101", 9, 1, "unexpected `}`, expected `mesh`, `param`, `plan`, `submesh`, a name or pattern, end of file"),
        ],
    ),
    Case(
        "name-starting-with-digit",
        """\
        plan 8b for LlamaForCausalLM
        """,
        [
            E("E101", 1, 6, "expected a plan name, found `8b`", "names are letters, digits and `_`, not starting with a digit"),
        ],
    ),
    Case(
        "pattern-where-a-name-is-expected",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on t*p {
          lm_head : colwise
        }
        """,
        [
            E("E101", 6, 20, "expected a mesh dimension or submesh, found `t*p`", "names are letters, digits and `_`, not starting with a digit"),
        ],
    ),
    Case(
        "pattern-empty-segment",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        activation_checkpoint model..layers.* { mode = full }
        """,
        [
            E("E105", 6, 23, "empty segment in pattern `model..layers.*` (a stray `.`)"),
        ],
    ),
    Case(
        "pattern-globstar-inside-segment",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        activation_checkpoint model.layers** { mode = full }
        """,
        [
            E("E105", 6, 23, "`**` must be a whole segment in `model.layers**` (write `a.**.b`, not `a**b`)"),
        ],
    ),
    Case(
        "pattern-empty-alternative",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          model.layers.*.mlp.{gate,}_proj : colwise
        }
        """,
        [
            E("E105", 7, 3, "empty alternative in `{gate,}` of pattern `model.layers.*.mlp.{gate,}_proj`"),
        ],
    ),
    Case(
        "unknown-section",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_paralel on tp {
          lm_head : colwise
        }
        """,
        [
            E("E201", 6, 1, "unknown section `tensor_paralel`", "did you mean `tensor_parallel`?"),
        ],
    ),
    Case(
        "unknown-style",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwsie
        }
        """,
        [
            E("E202", 7, 13, "unknown style `colwsie`", "did you mean `colwise`?"),
        ],
    ),
    Case(
        "unknown-setting",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
          algoritm = ffd
        }
        """,
        [
            E("E203", 8, 3, "`packing` has no setting `algoritm`", "did you mean `algorithm`?"),
        ],
    ),
    Case(
        "unknown-item",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          units model.layers.*
          root
        }
        """,
        [
            E("E210", 7, 3, "`fully_shard` has no item `units`", "did you mean `unit`?"),
        ],
    ),
    Case(
        "unknown-style-argument",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(outptu = shard(-1))
        }
        """,
        [
            E("E203", 7, 21, "`colwise` has no argument `outptu`", "did you mean `output`?"),
        ],
    ),
    Case(
        "unknown-dtype",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          mixed_precision { param = bf61, reduce = fp32 }
          root
        }
        """,
        [
            E("E204", 7, 29, "`mixed_precision.param`: unknown dtype `bf61`", "did you mean `bf16`?"),
        ],
    ),
    Case(
        "unknown-placement-call",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(output = shrad(-1))
        }
        """,
        [
            E("E205", 7, 30, "`colwise(output = …)`: unknown placement `shrad`", "did you mean `shard`?"),
        ],
    ),
    Case(
        "unknown-placement-name",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          model.norm : replicate(output = replicated)
        }
        """,
        [
            E("E205", 7, 35, "`replicate(output = …)`: unknown placement `replicated`", "did you mean `replicate`?"),
        ],
    ),
    Case(
        "unknown-enum-value",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
          algorithm = fdd
        }
        """,
        [
            E("E208", 8, 15, "`packing.algorithm`: `fdd` is not one of `ffd`, `bfd` or `greedy`", "did you mean `ffd`?"),
        ],
    ),
    Case(
        "unknown-mesh-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          dp_shrad = 2
        }
        """,
        [
            E("E206", 4, 3, "unknown mesh dimension `dp_shrad`", "did you mean `dp_shard`?"),
        ],
    ),
    Case(
        "on-undeclared-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        context_parallel on cp {
          attention model.layers.*.self_attn
        }
        """,
        [
            E("E207", 6, 21, "`on cp`: no such mesh dimension or submesh", "declare `cp` in the `mesh` block"),
        ],
    ),
    Case(
        "on-without-mesh",
        """\
        plan p for M
        tensor_parallel on tp {
          lm_head : colwise
        }
        """,
        [
            E("E207", 2, 20, "`on tp`: the plan declares no mesh", "add `mesh { tp = … }`"),
        ],
    ),
    Case(
        "name-where-integer-expected",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = long
        }
        """,
        [
            E("E301", 7, 13, "`packing.seq_len`: expected a positive integer, found `long`"),
        ],
    ),
    Case(
        "shard-without-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(output = shard)
        }
        """,
        [
            E("E301", 7, 30, "`colwise(output = …)`: `shard` needs the tensor dimension it splits", "write `shard(0)`, `shard(1)` or `shard(-1)`"),
        ],
    ),
    Case(
        "shard-with-a-name",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(output = shard(x))
        }
        """,
        [
            E("E301", 7, 30, "`colwise(output = …)`: `shard(x)`: shard takes one integer dimension", "write `shard(1)` or `shard(-1)`"),
        ],
    ),
    Case(
        "replicate-with-arguments",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(input = replicate(1))
        }
        """,
        [
            E("E301", 7, 29, "`colwise(input = …)`: `replicate` takes no arguments", "write `replicate`"),
        ],
    ),
    Case(
        "integer-where-boolean-expected",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          offload { pin_memory = 1 }
          root
        }
        """,
        [
            E("E301", 7, 26, "`offload.pin_memory`: expected `true` or `false`, found `1`"),
        ],
    ),
    Case(
        "auto-misspelt",
        """\
        plan p for M
        mesh {
          dp_shard = atuo
        }
        """,
        [
            E("E301", 3, 14, "mesh dimension `dp_shard`: expected a positive integer or `auto`, found `atuo`", "did you mean `auto`?"),
        ],
    ),
    Case(
        "mesh-dimension-zero",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 0
        }
        """,
        [
            E("E303", 4, 8, "mesh dimension `tp`: expected a positive integer, found 0"),
        ],
    ),
    Case(
        "every-zero",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        activation_checkpoint model.layers.* { every = 0 }
        """,
        [
            E("E303", 6, 48, "`activation_checkpoint.every`: expected a positive integer, found 0"),
        ],
    ),
    Case(
        "reshard-after-forward-one",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          root { reshard_after_forward = 1 }
        }
        """,
        [
            E("E303", 7, 34, "`root.reshard_after_forward`: expected an integer ≥ 2, found 1"),
        ],
    ),
    Case(
        "duplicate-mesh-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
          tp = 4
        }
        """,
        [
            E("E401", 5, 3, "mesh dimension `tp` is declared twice", "first declared at line 4"),
        ],
    ),
    Case(
        "mesh-dimensions-out-of-order",
        """\
        plan p for M
        mesh {
          tp = 2
          dp_shard = auto
        }
        """,
        [
            E("E407", 4, 3, "`dp_shard` is declared after `tp`", "declare dimensions in the order pp, dp_replicate, dp_shard, cp, tp, ep"),
        ],
    ),
    Case(
        "two-auto-dimensions",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          cp = auto
        }
        """,
        [
            E("E402", 4, 3, "`cp` and `dp_shard` are both `auto`", "at most one dimension can take what is left of the world size"),
        ],
    ),
    Case(
        "ep-auto",
        """\
        plan p for M
        mesh {
          dp_shard = 4
          ep = auto
        }
        """,
        [
            E("E301", 4, 3, "`ep` cannot be `auto`", "give the expert-parallel size; it must divide dp_shard × cp × tp"),
        ],
    ),
    Case(
        "second-mesh-block",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        mesh {
          cp = 2
        }
        """,
        [
            E("E403", 6, 1, "a second `mesh` block", "the mesh is declared at line 2"),
        ],
    ),
    Case(
        "submesh-unknown-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        submesh fsdp = dp_shard * cp
        """,
        [
            E("E409", 6, 27, "submesh `fsdp` uses `cp`, which the mesh does not declare", "declare `cp` in the `mesh` block"),
        ],
    ),
    Case(
        "submesh-out-of-order",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        submesh both = tp * dp_shard
        """,
        [
            E("E409", 6, 1, "submesh `both` lists dimensions out of mesh order", "write `dp_shard * tp`"),
        ],
    ),
    Case(
        "submesh-named-like-a-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        submesh tp = dp_shard
        """,
        [
            E("E410", 6, 1, "submesh `tp` has the name of a mesh dimension"),
        ],
    ),
    Case(
        "submesh-declared-twice",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        submesh dp = dp_shard
        submesh dp = tp
        """,
        [
            E("E410", 7, 1, "submesh `dp` is declared twice", "first declared at line 6"),
        ],
    ),
    Case(
        "submesh-repeats-a-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        submesh dp = dp_shard * dp_shard
        """,
        [
            E("E409", 6, 25, "submesh `dp` names `dp_shard` twice"),
        ],
    ),
    Case(
        "duplicate-section",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
        }
        packing {
          seq_len = 8192
        }
        """,
        [
            E("E403", 9, 1, "a second `packing` section", "the first is at line 6; merge them"),
        ],
    ),
    Case(
        "duplicate-checkpoint-for-same-modules",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        activation_checkpoint model.layers.* { mode = full }
        activation_checkpoint model.layers.* { mode = selective }
        """,
        [
            E("E403", 7, 1, "a second `activation_checkpoint` section for the same modules", "the first is at line 6; merge them"),
        ],
    ),
    Case(
        "duplicate-rule-pattern",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          model.layers.*.mlp.down_proj : rowwise
          model.layers.*.mlp.up_proj   : colwise
          model.layers.*.mlp.down_proj : colwise
        }
        """,
        [
            E("E404", 9, 3, "`model.layers.*.mlp.down_proj` already has a rule in this section", "the first rule is at line 7"),
        ],
    ),
    Case(
        "duplicate-setting",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
          seq_len = 8192
        }
        """,
        [
            E("E405", 8, 3, "`seq_len` is set twice", "first set at line 7"),
        ],
    ),
    Case(
        "duplicate-style-argument",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(output = shard(-1), output = replicate)
        }
        """,
        [
            E("E405", 7, 41, "argument `output` is given twice"),
        ],
    ),
    Case(
        "duplicate-param",
        """\
        plan p for M
        param tp = 4
        param tp = 8
        mesh {
          tp = tp
        }
        """,
        [
            E("E406", 3, 1, "parameter `tp` is declared twice", "first declared at line 2"),
        ],
    ),
    Case(
        "duplicate-header",
        """\
        plan llama for LlamaForCausalLM
        plan qwen for Qwen2ForCausalLM
        """,
        [
            E("E413", 2, 1, "a second `plan` header", "the header is at line 1"),
        ],
    ),
    Case(
        "missing-header",
        """\
        mesh {
          tp = 2
        }
        """,
        [
            E("E408", 1, 1, "the plan has no header", "start the file with `plan NAME for ARCHITECTURE, …`"),
        ],
    ),
    Case(
        "fully-shard-without-root",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          unit model.layers.*
        }
        """,
        [
            E("E412", 6, 1, "`fully_shard` has no `root`", "add `root` to the section: the whole model must be wrapped last"),
        ],
    ),
    Case(
        "duplicate-root",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          root
          root
        }
        """,
        [
            E("E405", 8, 3, "`root` is given twice", "first given at line 7"),
        ],
    ),
    Case(
        "unit-without-patterns",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          unit
          root
        }
        """,
        [
            E("E412", 7, 3, "`unit` needs module patterns", "write `unit model.layers.*`"),
        ],
    ),
    Case(
        "module-in-two-units",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          unit model.layers.*
          unit model.norm, model.layers.*
          root
        }
        """,
        [
            E("E404", 8, 20, "`model.layers.*` is already in a unit", "see line 7"),
        ],
    ),
    Case(
        "fsdp-on-tp-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise
        }
        fully_shard on (dp_shard, tp) {
          root
        }
        """,
        [
            E("E509", 9, 27, "fully_shard on `tp` overlaps tensor_parallel's `tp` (both use `tp`)", "FSDP shards over data-parallel dimensions; tensor_parallel is at line 6"),
        ],
    ),
    Case(
        "fsdp-submesh-overlaps-tp",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        submesh flat = dp_shard * tp
        tensor_parallel on tp {
          lm_head : colwise
        }
        fully_shard on flat {
          root
        }
        """,
        [
            E("E509", 10, 16, "fully_shard on `flat` overlaps tensor_parallel's `tp` (both use `tp`)", "FSDP shards over data-parallel dimensions; tensor_parallel is at line 7"),
        ],
    ),
    Case(
        "fully-shard-on-three-names",
        """\
        plan p for M
        mesh {
          dp_replicate = 2
          dp_shard = auto
          cp = 2
        }
        fully_shard on (dp_replicate, dp_shard, cp) {
          root
        }
        """,
        [
            E("E411", 7, 41, "`fully_shard` takes one name (FSDP) or two (HSDP: replicate, shard)"),
        ],
    ),
    Case(
        "tensor-parallel-on-two-dimensions",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on (dp_shard, tp) {
          lm_head : colwise
        }
        """,
        [
            E("E411", 6, 21, "`tensor_parallel` runs on `tp`, not on `dp_shard`", "write `tensor_parallel on tp`"),
            E("E411", 6, 31, "`tensor_parallel` runs on one mesh dimension"),
        ],
    ),
    Case(
        "rule-outside-tensor-parallel",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          seq_len = 4096
          lm_head : colwise
        }
        """,
        [
            E("E411", 8, 3, "`packing` takes no `PATTERN : STYLE` rules", "rules belong in `tensor_parallel on DIM { … }`"),
        ],
    ),
    Case(
        "conversion-on-colwise",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(shard(1) -> replicate)
        }
        """,
        [
            E("E411", 7, 21, "`colwise` takes no layout conversions", "conversions `a -> b` belong to prepare_input and prepare_output"),
        ],
    ),
    Case(
        "positional-argument-on-colwise",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          lm_head : colwise(shard(1))
        }
        """,
        [
            E("E411", 7, 21, "`colwise` takes keyword arguments", "write e.g. `colwise(input = shard(1))`"),
        ],
    ),
    Case(
        "positional-argument-on-prepare-input",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          model.layers.*.mlp : prepare_input(shard(1))
        }
        """,
        [
            E("E301", 7, 38, "`prepare_input` takes conversions `from -> to`", "write e.g. `prepare_input(shard(1) -> replicate)`"),
        ],
    ),
    Case(
        "prepare-input-without-conversions",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          model.layers.*.mlp : prepare_input
        }
        """,
        [
            E("E412", 7, 24, "`prepare_input` needs at least one conversion", "write e.g. `prepare_input(shard(1) -> replicate)`"),
        ],
    ),
    Case(
        "named-and-positional-conversions",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel on tp {
          model.layers.*.self_attn : prepare_input(hidden_states: shard(1) -> replicate, shard(1) -> replicate)
        }
        """,
        [
            E("E411", 7, 30, "`prepare_input` mixes named and positional conversions", "name every input (`hidden_states: …`) or none"),
        ],
    ),
    Case(
        "setting-written-as-item",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          cp = 2
        }
        context_parallel on cp {
          attention model.layers.*.self_attn
          load_balance headtail
        }
        """,
        [
            E("E411", 8, 3, "`load_balance` needs a value", "write `load_balance = …`"),
        ],
    ),
    Case(
        "item-written-as-setting",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        fully_shard on dp_shard {
          mixed_precision = bf16
          root
        }
        """,
        [
            E("E411", 7, 3, "`mixed_precision` is not a setting of `fully_shard`", "write `mixed_precision …` without `=`"),
        ],
    ),
    Case(
        "packing-without-seq-len",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing {
          algorithm = ffd
        }
        """,
        [
            E("E412", 6, 1, "`packing` needs `seq_len = …`"),
        ],
    ),
    Case(
        "tensor-parallel-without-on",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        tensor_parallel {
          lm_head : colwise
        }
        """,
        [
            E("E412", 6, 1, "`tensor_parallel` needs `on DIM`", "write `tensor_parallel on DIM { … }`"),
        ],
    ),
    Case(
        "packing-on-a-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
          tp = 2
        }
        packing on dp_shard {
          seq_len = 4096
        }
        """,
        [
            E("E411", 6, 12, "`packing` takes no `on`"),
        ],
    ),
    Case(
        "context-parallel-without-attention",
        """\
        plan p for M
        mesh {
          cp = 2
        }
        context_parallel on cp {
          load_balance = headtail
        }
        """,
        [
            E("E412", 5, 1, "`context_parallel` names no attention modules", "add `attention model.layers.*.self_attn`"),
        ],
    ),
    Case(
        "pipeline-without-microbatches",
        """\
        plan p for M
        mesh {
          pp = 2
        }
        pipeline on pp {
          split model.layers.8
        }
        """,
        [
            E("E412", 5, 1, "`pipeline` needs `microbatches = …`"),
        ],
    ),
    Case(
        "unused-param",
        """\
        plan p for M
        param width = 4096
        mesh {
          tp = 2
        }
        """,
        [
            E("W101", 2, 1, "parameter `width` is never used"),
        ],
    ),
    Case(
        "set-unknown-name",
        """\
        plan p for M
        param tp = 2
        mesh {
          tp = tp
        }
        """,
        [
            E("E209", 0, 0, "the plan has no parameter `tpp`", "did you mean `tp`?"),
        ],
        overrides=("tpp=4",),
    ),
    Case(
        "set-wrong-type",
        """\
        plan p for M
        param tp = 2
        mesh {
          tp = tp
        }
        """,
        [
            E("E302", 0, 0, "`tp` is an integer (declared at line 2), not a name"),
        ],
        overrides=("tp=auto",),
    ),
    Case(
        "set-malformed",
        """\
        plan p for M
        param tp = 2
        mesh {
          tp = tp
        }
        """,
        [
            E("E304", 0, 0, "`--set tp` is not NAME=VALUE", "write e.g. `--set tp=4` or `--set mesh.dp_shard=8`"),
        ],
        overrides=("tp",),
    ),
    Case(
        "set-twice",
        """\
        plan p for M
        param tp = 2
        mesh {
          tp = tp
        }
        """,
        [
            E("E304", 0, 0, "`tp` is set twice on the command line"),
        ],
        overrides=("tp=4", "tp=8"),
    ),
    Case(
        "set-undeclared-mesh-dimension",
        """\
        plan p for M
        mesh {
          dp_shard = auto
        }
        """,
        [
            E("E209", 0, 0, "the mesh declares no `cp`", "declare `cp` in the plan's `mesh` block to set it"),
        ],
        overrides=("mesh.cp=2",),
    ),
    Case(
        "set-mesh-dimension-not-a-size",
        """\
        plan p for M
        mesh {
          dp_shard = auto
        }
        """,
        [
            E("E302", 0, 0, "mesh dimension `dp_shard`: expected a positive integer or `auto`, found `many`"),
        ],
        overrides=("mesh.dp_shard=many",),
    ),
    Case(
        "set-out-of-range-value",
        """\
        plan p for M
        param tp = 2
        mesh {
          tp = tp
        }
        """,
        [
            E("E303", 4, 8, "mesh dimension `tp`: expected a positive integer, found -1 (from --set tp=-1)"),
        ],
        overrides=("tp=-1",),
    ),
    Case(
        "set-single-quoted",
        """\
        plan p for M
        param name = x
        """,
        [
            E("E302", 0, 0, "unexpected character `'`", "strings are written in double quotes on one line"),
            E("W101", 2, 1, "parameter `name` is never used"),
        ],
        overrides=("name='y'",),
    ),

]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_diagnostic(case: Case) -> None:
    found = diagnose(case.text, case.overrides)
    assert [E(d.code, d.span.line, d.span.column, d.message, d.hint) for d in found] == case.expected
    for d in found:
        assert d.code in CATALOGUE
        assert d.severity == ("warning" if d.code.startswith("W") else "error")
        if d.span.line == 0:  # about a --set, named by its own text
            assert d.span.file in {f"--set {o}" for o in case.overrides}
        else:
            assert d.span.file == "<plan>"


def test_cases_are_many_and_varied() -> None:
    assert len(CASES) >= 35
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.text for c in CASES} | {(c.text, c.overrides) for c in CASES if c.overrides}) >= 35
    codes = {e.code for c in CASES for e in c.expected}
    assert len(codes) >= 25, sorted(codes)
    assert all(c.expected for c in CASES)


def test_a_valid_plan_has_no_diagnostics() -> None:
    """The base the cases start from is itself clean: every diagnostic above is the mistake's."""
    text = textwrap.dedent("""\
        plan p for M
        param tp = 2
        mesh {
          dp_shard = auto
          tp = tp
        }
        tensor_parallel on tp {
          lm_head : colwise(output = shard(-1))
        }
        fully_shard on dp_shard {
          unit model.layers.*
          root
        }
        packing {
          seq_len = 4096
        }
        """)
    assert diagnose(text) == []
    assert diagnose(text, ["tp=4", "mesh.dp_shard=8"]) == []


# Cases found by fuzzing the language: each once gave a traceback, a wrong position or
# a misleading message.
MESH = "plan p for M\nmesh {\n  dp_shard = auto\n  tp = 2\n}\n"
FUZZ_CASES: list[tuple[str, str, tuple[str, ...], list[E]]] = [
    ("integer-beyond-64-bits", "plan p for M\nparam n = " + "9" * 4301 + "\n", (),
     [E("E303", 2, 11, "integer `999999999999999999999999…` is out of range", "integers must fit in 64 bits")]),
    ("rule-missing-colon", MESH + "tensor_parallel on tp {\n  model.norm sequence_parallel\n}\n", (),
     [E("E101", 7, 3, "`model.norm sequence_parallel` is missing the `:` of a rule",
        "write `model.norm : sequence_parallel`")]),
    ("rule-written-as-setting", MESH + "tensor_parallel on tp {\n  lm_head = colwise\n}\n", (),
     [E("E203", 7, 3, "`tensor_parallel` takes rules, not settings",
        "a rule is written `PATTERN : STYLE`, e.g. `lm_head : colwise`")]),
    ("value-followed-by-junk", "plan p for M\nparam tp = 4 8\n", (),
     [E("E101", 2, 14, "unexpected `8`, expected end of line")]),
    ("byte-order-mark", "\ufeffplan p for M\nmesh {\n  dp_shard = auto\n}\n", (), []),
    ("nul-byte-column", "plan p for M\nmesh {\n  tp = 2\x00\n}\n", (),
     [E("E102", 3, 9, "NUL byte in plan text")]),
    ("malformed-root-no-false-missing-root",
     "plan p for M\nmesh {\n  dp_shard = auto\n}\nfully_shard on dp_shard {\n  root model\n}\n", (),
     [E("E411", 6, 8, "`root` takes no module patterns")]),
    ("on-list-without-parens", MESH + "fully_shard on dp_shard, tp {\n  root\n}\n", (),
     [E("E101", 6, 24, "unexpected `,`, expected `{`, a name or pattern, end of line",
        "several dimensions are written `on (A, B)`")]),
    ("unclosed-block-blamed-on-next-statement",
     MESH + "packing {\n  seq_len = 4096\n\nfully_shard on dp_shard {\n  root\n}\n", (),
     [E("E101", 9, 16, "unexpected `dp_shard`, expected `,`, `{`, `}`, end of line",
        "the `{` opened at line 6 is not closed")]),
    ("set-string-for-integer", "plan p for M\nparam n = 1\nmesh {\n  tp = n\n}\n", ('n="4"',),
     [E("E302", 0, 0, "`n` is an integer (declared at line 2), not a string")]),
    ("set-mesh-without-dimension", MESH, ("mesh.=4",),
     [E("E304", 0, 0, "`--set mesh.=4` is not NAME=VALUE", "write e.g. `--set tp=4` or `--set mesh.dp_shard=8`")]),
    ("set-dimension-as-param", MESH, ("tp=4",),
     [E("E209", 0, 0, "the plan has no parameter `tp`", "`tp` is a mesh dimension: write `--set mesh.tp=4`")]),
]


@pytest.mark.parametrize("name,text,overrides,expected", FUZZ_CASES, ids=[c[0] for c in FUZZ_CASES])
def test_fuzz_findings(name: str, text: str, overrides: tuple[str, ...], expected: list[E]) -> None:
    found = [d for d in diagnose(text, overrides) if d.severity == "error"]
    assert [E(d.code, d.span.line, d.span.column, d.message, d.hint) for d in found] == expected


def test_param_and_mesh_override_of_one_dimension_conflict() -> None:
    text = "plan p for M\nparam tp = 2\nmesh {\n  dp_shard = auto\n  tp = tp\n}\n"
    found = diagnose(text, ("tp=4", "mesh.tp=8"))
    assert [(d.code, d.message) for d in found] == [
        ("E304", "`--set tp=4` and `--set mesh.tp=…` both set mesh dimension `tp`"),
    ]
