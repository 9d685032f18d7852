"""Model-free checks: syntax tree + `--set` overrides → `PlanSpec`, or every error.

What this guarantees when it returns no errors: exactly one header; every section,
setting, item, style, argument, dtype and placement name exists; every value has its
type (params and overrides substituted); mesh dimensions are known, unique, in canonical
order, with at most one `auto`; submeshes are products of declared dimensions in mesh
order; every `on` names a declared dimension or submesh; no section, setting or rule
pattern is written twice; `fully_shard` has a root and its mesh is disjoint from the
tensor-parallel one. What needs the model or the world size is the planner's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import ast, schema
from .errors import PlanError, PlanRejected, Span, did_you_mean, one_of
from .parser import parse_value
from .schema import SECTIONS, PlacementType, SettingSchema, SizeType, TypeProblem
from .spec import (
    MESH_DIMS,
    AdaptersSpec,
    CheckpointSpec,
    ContextParallelSpec,
    Conversion,
    ExpertParallelSpec,
    FullyShardSpec,
    MeshDimSpec,
    MeshSpec,
    MixedPrecisionSpec,
    OffloadSpec,
    PackingSpec,
    PatternSpec,
    PipelineSpec,
    PlanSpec,
    QuantizeSpec,
    StyleSpec,
    SubmeshSpec,
    TensorParallelSpec,
    TPRuleSpec,
    UnitSpec,
)
from .styles import STYLES

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Override:
    """One `--set NAME=VALUE`, parsed."""

    name: str
    value: ast.Value
    origin: str  # the text as given, for messages


@dataclass(frozen=True)
class CheckResult:
    spec: PlanSpec | None
    diagnostics: tuple[PlanError, ...]

    @property
    def errors(self) -> list[PlanError]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[PlanError]:
        return [d for d in self.diagnostics if d.severity == "warning"]


def check(plan: ast.Plan, overrides: Iterable[str] = ()) -> CheckResult:
    """Check a parsed plan with `--set` texts; never raises for user input."""
    checker = _Checker(plan)
    spec = checker.run(list(overrides))
    diagnostics = tuple(sorted(checker.diagnostics, key=PlanError.sort_key))
    has_errors = any(d.severity == "error" for d in diagnostics)
    return CheckResult(None if has_errors else spec, diagnostics)


def _set_span(origin: str) -> Span:
    return Span(f"--set {origin}", 0, 0, 0, 0)


def _kind_of(value: ast.Value) -> str:
    if isinstance(value, ast.Int):
        return "an integer"
    if isinstance(value, ast.Float):
        return "a number"
    if isinstance(value, ast.Bool):
        return "a boolean"
    if isinstance(value, ast.Str):
        return "a string"
    return "a name"


class _Checker:
    def __init__(self, plan: ast.Plan) -> None:
        self.plan = plan
        self.diagnostics: list[PlanError] = []
        self.params: dict[str, ast.Param] = {}
        self.param_values: dict[str, tuple[ast.Value, str | None]] = {}
        self.used_params: set[str] = set()
        self.mesh_overrides: dict[str, Override] = {}
        self.dims: dict[str, MeshDimSpec] = {}
        self.submeshes: dict[str, SubmeshSpec] = {}

    def error(self, span: Span, code: str, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(PlanError(span, code, message, hint))

    # ---------------------------------------------------------------- driver

    def run(self, overrides: Sequence[str]) -> PlanSpec | None:
        header = self._header()
        self._params()
        self._overrides(overrides)
        mesh = self._mesh()
        sections = self._sections()
        for name, param in self.params.items():
            # `seq_len` is also read by the planner: the sequence length SP/CP must divide.
            if name not in self.used_params and name != "seq_len":
                self.diagnostics.append(PlanError(param.head(f"param {name}"), "W101",
                                                  f"parameter `{name}` is never used",
                                                  severity="warning"))
        return PlanSpec(
            name=header.name if header else "",
            archs=header.archs if header else (),
            file=self.plan.file,
            params={n: self._python(v) for n, (v, _) in self.param_values.items()},
            mesh=mesh,
            span=self.plan.span,
            header_span=header.span if header else self.plan.span,
            param_spans={n: p.span for n, p in self.params.items()},
            **sections,
        )

    @staticmethod
    def _python(value: ast.Value) -> object:
        if isinstance(value, ast.Int | ast.Float | ast.Bool | ast.Str):
            return value.value
        return schema.shown(value)

    # ---------------------------------------------------------------- header, params

    def _header(self) -> ast.Header | None:
        headers = [s for s in self.plan.statements if isinstance(s, ast.Header)]
        if not headers:
            self.error(Span.point(self.plan.file), "E408", "the plan has no header",
                       "start the file with `plan NAME for ARCHITECTURE, …`")
            return None
        for extra in headers[1:]:
            self.error(extra.head("plan"), "E413", "a second `plan` header",
                       f"the header is at line {headers[0].span.line}")
        return headers[0]

    def _params(self) -> None:
        for param in self.plan.params:
            if param.name in self.params:
                first = self.params[param.name].span.line
                self.error(param.head(f"param {param.name}"), "E406",
                           f"parameter `{param.name}` is declared twice", f"first declared at line {first}")
                continue
            if isinstance(param.value, ast.Name) and param.value.name in self.params:
                # A param defined from another one is resolved once, here.
                self.used_params.add(param.value.name)
                self.param_values[param.name] = self.param_values[param.value.name]
            else:
                self.param_values[param.name] = (param.value, None)
            self.params[param.name] = param

    def _overrides(self, texts: Sequence[str]) -> None:
        seen: set[str] = set()
        for text in texts:
            name, sep, raw = text.partition("=")
            name, raw = name.strip(), raw.strip()
            span = _set_span(text)
            if not sep or not name or not raw or name == "mesh." or name.endswith("."):
                self.error(span, "E304", f"`--set {text}` is not NAME=VALUE",
                           "write e.g. `--set tp=4` or `--set mesh.dp_shard=8`")
                continue
            if name in seen:
                self.error(span, "E304", f"`{name}` is set twice on the command line")
                continue
            seen.add(name)
            try:
                value = parse_value(raw, f"--set {text}")
            except PlanRejected as e:
                for d in e.diagnostics:
                    self.error(span, "E302", d.message, d.hint)
                continue
            if name.startswith("mesh."):
                self._mesh_override(Override(name[5:], value, text), span)
            elif name in self.params:
                declared = self.params[name]
                shadowed = [d.name for d in self._mesh_dims()
                            if isinstance(d.value, ast.Name) and d.value.name == name
                            and any(t.split("=", 1)[0].strip() == f"mesh.{d.name}" for t in texts)]
                if shadowed:
                    self.error(span, "E304", f"`--set {text}` and `--set mesh.{shadowed[0]}=…` both set "
                               f"mesh dimension `{shadowed[0]}`", "give only one of them")
                    continue
                # An integer is a number: `--set dropout=0` for `param dropout = 0.05`.
                widened = isinstance(value, ast.Int) and isinstance(declared.value, ast.Float)
                if _kind_of(value) != _kind_of(declared.value) and not widened:
                    self.error(span, "E302",
                               f"`{name}` is {_kind_of(declared.value)} (declared at line "
                               f"{declared.span.line}), not {_kind_of(value)}")
                    continue
                self.param_values[name] = (value, text)
            else:
                dims = [d.name for d in self._mesh_dims()]
                if name in dims:
                    hint: str | None = f"`{name}` is a mesh dimension: write `--set mesh.{name}={raw}`"
                else:
                    hint = did_you_mean(name, [*self.params, *(f"mesh.{d}" for d in dims)])
                    if hint is None:
                        hint = (f"parameters are {one_of(self.params)}" if self.params
                                else "the plan declares no `param`")
                        if dims:
                            hint += f"; mesh dimensions are set as `--set mesh.DIM=N` ({one_of(dims)})"
                self.error(span, "E209", f"the plan has no parameter `{name}`", hint)

    def _mesh_dims(self) -> tuple[ast.MeshDim, ...]:
        mesh = self.plan.mesh
        return mesh.dims if mesh else ()

    def _mesh_override(self, override: Override, span: Span) -> None:
        declared = {d.name for d in self._mesh_dims()}
        if override.name not in declared:
            hint = did_you_mean(override.name, declared)
            if override.name in MESH_DIMS and not hint:
                hint = f"declare `{override.name}` in the plan's `mesh` block to set it"
            self.error(span, "E209", f"the mesh declares no `{override.name}`", hint)
            return
        try:
            SizeType().convert(override.value)
        except TypeProblem as p:
            self.error(span, "E302", f"mesh dimension `{override.name}`: {p.message}", p.hint)
            return
        self.mesh_overrides[override.name] = override

    def resolve(self, value: ast.Value) -> tuple[ast.Value, str]:
        """Substitute a param reference; returns the value and a note on where it came from."""
        if isinstance(value, ast.Name) and value.name in self.param_values:
            self.used_params.add(value.name)
            resolved, origin = self.param_values[value.name]
            note = f" (from --set {origin})" if origin else f" (param `{value.name}`)"
            return resolved, note
        return value, ""

    def convert(self, setting: SettingSchema, value: ast.Value, span: Span, what: str) -> Any:
        resolved, note = self.resolve(value)
        try:
            return setting.type.convert(resolved)
        except TypeProblem as p:
            self.error(span, p.code, f"{what}: {p.message}{note}", p.hint)
            return None

    # ---------------------------------------------------------------- mesh

    def _mesh(self) -> MeshSpec:
        meshes = [s for s in self.plan.statements if isinstance(s, ast.Mesh)]
        for extra in meshes[1:]:
            self.error(extra.head("mesh"), "E403", "a second `mesh` block",
                       f"the mesh is declared at line {meshes[0].span.line}")
        dims: list[MeshDimSpec] = []
        auto: ast.MeshDim | None = None
        last_index = -1
        for dim in meshes[0].dims if meshes else ():
            span = dim.head(dim.name)
            if dim.name not in MESH_DIMS:
                self.error(span, "E206", f"unknown mesh dimension `{dim.name}`",
                           did_you_mean(dim.name, MESH_DIMS) or f"dimensions are {one_of(MESH_DIMS)}")
                continue
            if dim.name in self.dims:
                self.error(span, "E401", f"mesh dimension `{dim.name}` is declared twice",
                           f"first declared at line {self.dims[dim.name].span.line}")
                continue
            index = MESH_DIMS.index(dim.name)
            if index < last_index:
                self.error(span, "E407", f"`{dim.name}` is declared after `{MESH_DIMS[last_index]}`",
                           "declare dimensions in the order " + ", ".join(MESH_DIMS))
            last_index = max(last_index, index)
            override = self.mesh_overrides.get(dim.name)
            if isinstance(dim.value, ast.Name) and dim.value.name in self.params:
                self.used_params.add(dim.value.name)  # used by the text, even when overridden
            value = override.value if override else dim.value
            size = self.convert(SettingSchema(SizeType()), value, dim.value.span, f"mesh dimension `{dim.name}`")
            if size is None and self._is_auto(value):
                if dim.name == "ep":
                    self.error(dim.span, "E301", "`ep` cannot be `auto`",
                               "give the expert-parallel size; it must divide dp_shard × cp × tp")
                elif auto is not None:
                    self.error(dim.span, "E402", f"`{dim.name}` and `{auto.name}` are both `auto`",
                               "at most one dimension can take what is left of the world size")
                else:
                    auto = dim
            spec = MeshDimSpec(dim.name, size, dim.span)
            self.dims[dim.name] = spec
            dims.append(spec)
        submeshes = self._submeshes()
        return MeshSpec(tuple(dims), submeshes, meshes[0].span if meshes else self.plan.span)

    def _is_auto(self, value: ast.Value) -> bool:
        resolved, _ = self.resolve(value)
        return isinstance(resolved, ast.Name) and resolved.name == "auto"

    def _submeshes(self) -> tuple[SubmeshSpec, ...]:
        out = []
        for sub in self.plan.submeshes:
            span = sub.head(f"submesh {sub.name}")
            if sub.name in self.dims or sub.name in MESH_DIMS:
                self.error(span, "E410", f"submesh `{sub.name}` has the name of a mesh dimension")
                continue
            if sub.name in self.submeshes:
                self.error(span, "E410", f"submesh `{sub.name}` is declared twice",
                           f"first declared at line {self.submeshes[sub.name].span.line}")
                continue
            ok = True
            names: list[str] = []
            for ref in sub.dims:
                if ref.name not in self.dims:
                    ok = False
                    hint = did_you_mean(ref.name, self.dims)
                    if ref.name in MESH_DIMS and not hint:
                        hint = f"declare `{ref.name}` in the `mesh` block"
                    self.error(ref.span, "E409", f"submesh `{sub.name}` uses `{ref.name}`, "
                               "which the mesh does not declare", hint)
                elif ref.name in names:
                    ok = False
                    self.error(ref.span, "E409", f"submesh `{sub.name}` names `{ref.name}` twice")
                elif ref.name == "ep" and len(sub.dims) > 1:
                    ok = False
                    self.error(ref.span, "E409", "`ep` lives on its own expert mesh and cannot be "
                               "combined with other dimensions")
                names.append(ref.name)
            if ok and names != sorted(names, key=MESH_DIMS.index):
                ok = False
                self.error(span, "E409", f"submesh `{sub.name}` lists dimensions out of mesh order",
                           "write `" + " * ".join(sorted(names, key=MESH_DIMS.index)) + "`")
            spec = SubmeshSpec(sub.name, tuple(names), sub.span)
            self.submeshes[sub.name] = spec
            if ok:
                out.append(spec)
        return tuple(out)

    # ---------------------------------------------------------------- sections

    def _sections(self) -> dict[str, Any]:
        seen: dict[tuple[str, tuple[str, ...]], ast.Section] = {}
        result: dict[str, Any] = {"checkpoints": ()}
        for section in self.plan.sections:
            kind_span = section.head(section.kind)
            sch = SECTIONS.get(section.kind)
            if sch is None:
                known = [*SECTIONS, "mesh", "submesh", "param", "plan"]
                self.error(kind_span, "E201", f"unknown section `{section.kind}`",
                           did_you_mean(section.kind, known) or f"sections are {one_of(SECTIONS)}")
                continue
            key = (section.kind, tuple(p.text for p in section.patterns) if sch.repeat else ())
            if key in seen:
                self.error(kind_span, "E403", f"a second `{section.kind}` section"
                           + (" for the same modules" if sch.repeat else ""),
                           f"the first is at line {seen[key].span.line}; merge them")
                continue
            seen[key] = section
            on = self._on(section, sch)
            if sch.patterns == "required" and not section.patterns:
                self.error(kind_span, "E412", f"`{section.kind}` needs the modules it applies to",
                           f"write `{section.kind} model.layers.* {{ … }}`")
            elif sch.patterns == "forbidden" and section.patterns:
                self.error(section.patterns[0].span, "E411", f"`{section.kind}` takes no module patterns")
            body = _Body(self, section.kind, sch.settings, sch.items, sch.rules, section.body, kind_span)
            build = getattr(self, "_build_" + section.kind)
            field, value = build(section, on, body)
            result[field] = (*result[field], value) if field == "checkpoints" else value
        self._fsdp_tp_disjoint(result)
        self._quantized_storage(result)
        return result

    def _on(self, section: ast.Section, sch: schema.SectionSchema) -> tuple[str, ...]:
        kind_span = section.head(section.kind)
        if sch.on == "none":
            if section.on:
                self.error(section.on[0].span, "E411", f"`{section.kind}` takes no `on`")
            return ()
        if not section.on:
            what = "DIM" if sch.on == "one" else "(DIM, …)"
            self.error(kind_span, "E412", f"`{section.kind}` needs `on {what}`",
                       f"write `{section.kind} on {what} {{ … }}`")
            return ()
        if sch.on == "one" and len(section.on) > 1:
            self.error(section.on[1].span, "E411", f"`{section.kind}` runs on one mesh dimension")
        if section.kind == "fully_shard" and len(section.on) > 2:
            self.error(section.on[2].span, "E411", "`fully_shard` takes one name (FSDP) or two (HSDP: "
                       "replicate, shard)")
        names = []
        for ref in section.on:
            if ref.name in self.dims or ref.name in self.submeshes:
                dims = self._expand(ref.name)
                if sch.dimension is not None and dims != (sch.dimension,):
                    self.error(ref.span, "E411", f"`{section.kind}` runs on `{sch.dimension}`, not on "
                               f"`{ref.name}`" + (f" ({' × '.join(dims)})" if dims != (ref.name,) else ""),
                               f"write `{section.kind} on {sch.dimension}`"
                               + (f" and declare `{sch.dimension}` in the mesh" if sch.dimension not in self.dims else ""))
                    continue
                names.append(ref.name)
                continue
            if not self.dims:
                self.error(ref.span, "E207", f"`on {ref.name}`: the plan declares no mesh",
                           f"add `mesh {{ {ref.name} = … }}`")
                continue
            hint = did_you_mean(ref.name, [*self.dims, *self.submeshes])
            if not hint and ref.name in MESH_DIMS:
                hint = f"declare `{ref.name}` in the `mesh` block"
            self.error(ref.span, "E207", f"`on {ref.name}`: no such mesh dimension or submesh", hint)
        return tuple(names)

    def _expand(self, name: str) -> tuple[str, ...]:
        sub = self.submeshes.get(name)
        return sub.dims if sub else (name,)

    def _fsdp_tp_disjoint(self, result: Mapping[str, Any]) -> None:
        fsdp: FullyShardSpec | None = result.get("fully_shard")
        tp: TensorParallelSpec | None = result.get("tensor_parallel")
        if fsdp is None or tp is None or not tp.on:
            return
        tp_dims = set(self._expand(tp.on))
        section = next(s for s in self.plan.sections if s.kind == "fully_shard")
        for ref in section.on:
            name = ref.name
            shared = tp_dims & set(self._expand(name))
            if shared:
                self.error(ref.span, "E509",
                           f"fully_shard on `{name}` overlaps tensor_parallel's `{tp.on}` "
                           f"(both use {one_of(sorted(shared, key=MESH_DIMS.index))})",
                           f"FSDP shards over data-parallel dimensions; tensor_parallel is at line {tp.span.line}")

    def _quantized_storage(self, result: Mapping[str, Any]) -> None:
        """Packed NF4 storage FSDP2 cannot shard: bitsandbytes' uint8 storage under
        fully_shard trains to a loss of 0 or NaN (accelerate #3983); a float storage (the
        model's dtype) shards like any other parameter."""
        adapters: AdaptersSpec | None = result.get("adapters")
        fsdp: FullyShardSpec | None = result.get("fully_shard")
        quantize = adapters.quantize if adapters is not None else None
        if quantize is None or fsdp is None or quantize.backend != "bitsandbytes" or quantize.storage != "uint8":
            return
        span = adapters.setting_spans.get("quantize.storage", quantize.span) if adapters else quantize.span
        self.error(span, "E414", "bitsandbytes' uint8 storage cannot be sharded by fully_shard: "
                   "the 4-bit base trains to a loss of 0 or NaN",
                   "store the packed base in the model's dtype (`storage = bf16`), or use `backend = torchao`",
                   )

    # -- one builder per section kind: (field of PlanSpec, value)

    def _build_tensor_parallel(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        rules = []
        seen: dict[str, ast.Pattern] = {}
        for rule in body.rules:
            style = self._style(rule.style)
            for pattern in rule.patterns:
                if pattern.text in seen:
                    self.error(pattern.span, "E404", f"`{pattern.text}` already has a rule in this section",
                               f"the first rule is at line {seen[pattern.text].span.line}")
                    continue
                seen[pattern.text] = pattern
                if style is not None:
                    rules.append(TPRuleSpec(PatternSpec(pattern.text, pattern.span), style, rule.span))
        return "tensor_parallel", TensorParallelSpec(on[0] if on else "", tuple(rules), s.span)

    def _build_activation_checkpoint(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        v = body.values()
        return "checkpoints", CheckpointSpec(_patterns(s.patterns), v["mode"], v["every"], s.span)

    def _build_fully_shard(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        units = []
        root = None
        mp = None
        offload = None
        seen: dict[str, ast.Pattern] = {}
        for item, values in body.items:
            if item.keyword == "unit":
                for pattern in item.patterns:
                    if pattern.text in seen:
                        self.error(pattern.span, "E404", f"`{pattern.text}` is already in a unit",
                                   f"see line {seen[pattern.text].span.line}")
                    seen[pattern.text] = pattern
                units.append(UnitSpec(_patterns(item.patterns), values["reshard_after_forward"], item.span))
            elif item.keyword == "root":
                root = UnitSpec((), values["reshard_after_forward"], item.span)
            elif item.keyword == "mixed_precision":
                mp = MixedPrecisionSpec(values["param"], values["reduce"], values["output"],
                                        values["cast_forward_inputs"], item.span)
            elif item.keyword == "offload":
                offload = OffloadSpec(values["pin_memory"], item.span)
        written = any(getattr(e, "keyword", getattr(e, "key", None)) == "root" for e in (s.body.entries if s.body else ()))
        if root is None and not written:
            self.error(s.head(s.kind), "E412", "`fully_shard` has no `root`",
                       "add `root` to the section: the whole model must be wrapped last")
        return "fully_shard", FullyShardSpec(on, tuple(units), root, mp, offload, s.span)

    def _build_context_parallel(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        v = body.values()
        attention = tuple(p for item, _ in body.items for p in _patterns(item.patterns))
        if not attention:
            self.error(s.head(s.kind), "E412", "`context_parallel` names no attention modules",
                       "add `attention model.layers.*.self_attn`")
        return "context_parallel", ContextParallelSpec(on[0] if on else "", attention,
                                                       v["load_balance"], v["rotate"], s.span)

    def _build_expert_parallel(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        v = body.values()
        experts = tuple(p for item, _ in body.items for p in _patterns(item.patterns))
        if not experts:
            self.error(s.head(s.kind), "E412", "`expert_parallel` names no expert modules",
                       "add `experts model.layers.*.mlp.experts`")
        return "expert_parallel", ExpertParallelSpec(on[0] if on else "", experts, v["dispatch"], s.span)

    def _build_pipeline(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        v = body.values()
        splits = tuple(p for item, _ in body.items for p in _patterns(item.patterns))
        return "pipeline", PipelineSpec(on[0] if on else "", v["schedule"], v["microbatches"],
                                        v["virtual_stages"], splits, s.span)

    def _build_adapters(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        v = body.values()
        spans: dict[str, Span] = {e.key: e.span for e in (s.body.entries if s.body else ())
                                  if isinstance(e, ast.Setting)}
        targets: list[PatternSpec] = []
        seen: dict[str, ast.Pattern] = {}
        quantize = None
        for item, values in body.items:
            if item.keyword == "targets":
                for pattern in item.patterns:
                    if pattern.text in seen:
                        self.error(pattern.span, "E404", f"`{pattern.text}` is already a target",
                                   f"see line {seen[pattern.text].span.line}")
                        continue
                    seen[pattern.text] = pattern
                    targets.append(PatternSpec(pattern.text, pattern.span))
            elif item.keyword == "quantize":
                for entry in item.body.entries if item.body else ():
                    if isinstance(entry, ast.Setting):
                        spans[f"quantize.{entry.key}"] = entry.span
                quantize = self._quantize(item, values, spans)
        written = any(isinstance(e, ast.Item) and e.keyword == "targets" for e in (s.body.entries if s.body else ()))
        if not written:
            self.error(s.head(s.kind), "E412", "`adapters` names no target modules",
                       "add `targets model.layers.*.self_attn.{q,k,v,o}_proj` (base modules, as named "
                       "in the model without adapters)")
        return "adapters", AdaptersSpec(method=v["method"], targets=tuple(targets), rank=v["rank"],
                                        alpha=v["alpha"], dropout=v["dropout"], dtype=v["dtype"],
                                        quantize=quantize, span=s.span, setting_spans=spans)

    def _quantize(self, item: ast.Item, values: Mapping[str, Any], spans: Mapping[str, Span]) -> QuantizeSpec | None:
        if any(values[k] is None for k in ("format", "backend", "compute", "storage")):
            return None  # a value that did not convert, already reported
        if values["backend"] == "torchao" and values["storage"] != "uint8":
            self.error(spans.get("quantize.storage", item.span), "E414",
                       f"torchao packs NF4 into uint8; `storage = {values['storage']}` is bitsandbytes' option",
                       "leave `storage` out (uint8), or use `backend = bitsandbytes`")
        return QuantizeSpec(format=values["format"], backend=values["backend"], compute=values["compute"],
                            storage=values["storage"], block_size=values["block_size"],
                            scaler_block_size=values["scaler_block_size"], span=item.span)

    def _build_packing(self, s: ast.Section, on: tuple[str, ...], body: _Body) -> tuple[str, Any]:
        v = body.values()
        return "packing", PackingSpec(v["algorithm"], v["seq_len"], v["format"], v["max_per_bin"],
                                      v["overlong"], v["seed"], s.span)

    # ---------------------------------------------------------------- styles

    def _style(self, style: ast.Style) -> StyleSpec | None:
        sch = STYLES.get(style.name)
        name_span = style.head(style.name)
        if sch is None:
            self.error(name_span, "E202", f"unknown style `{style.name}`",
                       did_you_mean(style.name, STYLES) or f"styles are {one_of(STYLES)}")
            return None
        args: dict[str, object] = {}
        conversions: list[Conversion] = []
        ok = True
        for arg in style.args:
            if isinstance(arg, ast.KeywordArg):
                if arg.name not in sch.args:
                    ok = False
                    self.error(arg.head(arg.name), "E203", f"`{style.name}` has no argument `{arg.name}`",
                               did_you_mean(arg.name, sch.args)
                               or (f"arguments are {one_of(sch.args)}" if sch.args else None))
                elif arg.name in args:
                    ok = False
                    self.error(arg.head(arg.name), "E405", f"argument `{arg.name}` is given twice")
                else:
                    args[arg.name] = self.convert(sch.args[arg.name], arg.value, arg.value.span,
                                                  f"`{style.name}({arg.name} = …)`")
            elif isinstance(arg, ast.Conversion):
                if not sch.conversions:
                    ok = False
                    self.error(arg.span, "E411", f"`{style.name}` takes no layout conversions",
                               "conversions `a -> b` belong to prepare_input and prepare_output")
                    continue
                placement = PlacementType(allow_none=True)
                src = self.convert(SettingSchema(placement), arg.source, arg.source.span, "conversion source")
                dst = self.convert(SettingSchema(placement), arg.target, arg.target.span, "conversion target")
                conversions.append(Conversion(arg.name, src, dst, arg.span))
            else:
                ok = False
                if sch.conversions:
                    self.error(arg.span, "E301", f"`{style.name}` takes conversions `from -> to`",
                               f"write e.g. `{style.name}({schema.shown(arg.value)} -> replicate)`")
                else:
                    first = next(iter(sch.args), None)
                    self.error(arg.span, "E411", f"`{style.name}` takes keyword arguments",
                               f"write e.g. `{style.name}({first} = {schema.shown(arg.value)})`" if first else
                               f"`{style.name}` takes no arguments")
        named = {c.name is not None for c in conversions}
        if len(named) > 1:
            ok = False
            self.error(style.span, "E411", f"`{style.name}` mixes named and positional conversions",
                       "name every input (`hidden_states: …`) or none")
        if sch.conversions and not conversions and ok:
            ok = False
            self.error(name_span, "E412", f"`{style.name}` needs at least one conversion",
                       f"write e.g. `{style.name}(shard(1) -> replicate)`")
        for key, setting in sch.args.items():
            args.setdefault(key, setting.default)
        if not ok or any(v is None and sch.args[k].default is not None for k, v in args.items()):
            return None
        return StyleSpec(style.name, args, tuple(conversions), style.span)


def _patterns(patterns: tuple[ast.Pattern, ...]) -> tuple[PatternSpec, ...]:
    return tuple(PatternSpec(p.text, p.span) for p in patterns)


class _Body:
    """Checks one `{ … }` body against its settings/items schema; keeps converted values."""

    def __init__(self, checker: _Checker, owner: str, settings: Mapping[str, SettingSchema],
                 items: Mapping[str, schema.ItemSchema], rules_allowed: bool, body: ast.Body | None,
                 owner_span: Span) -> None:
        self.checker = checker
        self.owner = owner
        self.rules: list[ast.Rule] = []
        self.items: list[tuple[ast.Item, dict[str, Any]]] = []
        self._values = self._settings(settings, items, body, owner_span, rules_allowed)

    def values(self) -> dict[str, Any]:
        return self._values

    def _settings(self, settings: Mapping[str, SettingSchema], items: Mapping[str, schema.ItemSchema],
                  body: ast.Body | None, owner_span: Span, rules_allowed: bool) -> dict[str, Any]:
        c = self.checker
        values: dict[str, Any] = {}
        seen: dict[str, ast.Setting] = {}
        seen_items: dict[str, ast.Item] = {}
        for entry in body.entries if body else ():
            if isinstance(entry, ast.Setting):
                key_span = entry.head(entry.key)
                if entry.key not in settings:
                    if entry.key in items:
                        c.error(key_span, "E411", f"`{entry.key}` is not a setting of `{self.owner}`",
                                f"write `{entry.key} …` without `=`")
                    elif rules_allowed:
                        c.error(key_span, "E203", f"`{self.owner}` takes rules, not settings",
                                f"a rule is written `PATTERN : STYLE`, e.g. `{entry.key} : {schema.shown(entry.value)}`")
                    else:
                        c.error(key_span, "E203", f"`{self.owner}` has no setting `{entry.key}`",
                                did_you_mean(entry.key, [*settings, *items])
                                or (f"settings are {one_of(settings)}" if settings else
                                    f"`{self.owner}` takes no settings"))
                    continue
                if entry.key in seen:
                    c.error(key_span, "E405", f"`{entry.key}` is set twice",
                            f"first set at line {seen[entry.key].span.line}")
                    continue
                seen[entry.key] = entry
                values[entry.key] = c.convert(settings[entry.key], entry.value, entry.value.span,
                                              f"`{self.owner}.{entry.key}`")
            elif isinstance(entry, ast.Rule):
                if not rules_allowed:
                    c.error(entry.span, "E411", f"`{self.owner}` takes no `PATTERN : STYLE` rules",
                            "rules belong in `tensor_parallel on DIM { … }`")
                    continue
                self.rules.append(entry)
            elif rules_allowed and entry.body is None and len(entry.patterns) == 1 and entry.keyword not in items:
                c.error(entry.span, "E101", f"`{entry.keyword} {entry.patterns[0].text}` is missing the `:` of a rule",
                        f"write `{entry.keyword} : {entry.patterns[0].text}`")
            else:
                self._item(entry, items, settings, seen_items, rules_allowed)
        for key, setting in settings.items():
            if key not in seen:
                if setting.required:
                    c.error(owner_span, "E412", f"`{self.owner}` needs `{key} = …`",
                            setting.doc or None)
                values[key] = setting.default
        return values

    def _item(self, item: ast.Item, items: Mapping[str, schema.ItemSchema],
              settings: Mapping[str, SettingSchema], seen: dict[str, ast.Item], rules_allowed: bool) -> None:
        c = self.checker
        key_span = item.head(item.keyword)
        sch = items.get(item.keyword)
        if sch is None:
            if rules_allowed:
                c.error(key_span, "E101", f"`{item.keyword}` is not a rule",
                        f"a rule is written `PATTERN : STYLE`, e.g. `{item.keyword} : colwise`")
            elif item.keyword in settings:
                c.error(key_span, "E411", f"`{item.keyword}` needs a value",
                        f"write `{item.keyword} = …`")
            else:
                c.error(key_span, "E210", f"`{self.owner}` has no item `{item.keyword}`",
                        did_you_mean(item.keyword, [*items, *settings]) if _IDENT.fullmatch(item.keyword) else None
                        or (f"items are {one_of(items)}" if items else f"`{self.owner}` takes settings only"))
            return
        if not sch.repeat and item.keyword in seen:
            c.error(key_span, "E405", f"`{item.keyword}` is given twice",
                    f"first given at line {seen[item.keyword].span.line}")
            return
        seen[item.keyword] = item
        if sch.patterns == "required" and not item.patterns:
            c.error(key_span, "E412", f"`{item.keyword}` needs module patterns",
                    f"write `{item.keyword} model.layers.*`")
            return
        if sch.patterns == "forbidden" and item.patterns:
            c.error(item.patterns[0].span, "E411", f"`{item.keyword}` takes no module patterns")
            return
        sub = _Body(c, item.keyword, sch.settings, {}, False, item.body, key_span)
        self.items.append((item, sub.values()))
