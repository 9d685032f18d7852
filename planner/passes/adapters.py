"""Adapters (LoRA, QLoRA): which base modules get one, and whether the plan can carry them.

Guarantees, for a plan with an `adapters { … }` section:
- every `targets` pattern matches a module (E502) that PEFT's LoRA can adapt: a Linear,
  an Embedding or GPT-2's Conv1D (E513); two targets lines on one module are E503.
  Records `ctx.adapters`. An adapter on one name of a tied tensor (`lm_head` tied to
  `model.embed_tokens`) trains exactly (measured), so it is a warning (W108): merging it
  (`plan export --merged`, PEFT's merge_and_unload) would add it to the one tensor, and
  change the other name too;
- under tensor parallelism (tp > 1), the style on an adapted module has an adapter layout
  for its kind (the style registry's `adapter`: colwise, rowwise, replicate on a Linear);
  a style that touches no parameter (prepare_input / prepare_output) only converts the
  module's activations, which base and adapter then share, so it is accepted (E513);
- every size an adapter layout shards divides by tp: lora_A's weight is (rank, in),
  lora_B's (out, rank); a layout that shards the rank needs tp | rank, one that shards a
  feature the base does not shard needs tp | that feature (the base's own features are
  `Divisibility`'s) (E505);
- no dtype check between adapters and the base: FSDP2 (torch 2.13, `_init_mp_dtypes`)
  asks one dtype of a unit's trainable parameters only, and only the adapters train, in
  one dtype. fp32 adapters beside a bf16 (or NF4) base in one unit without mixed
  precision run and match one process (measured: the corpus' adapters_dtype_* cases);
- a quantized base (QLoRA) is a Linear (E514), gets no tensor-parallel style that shards
  or replicates its parameters (NF4 bases shard over FSDP only) (E514); bitsandbytes'
  float storage under fully_shard is the model's dtype (E514); the NF4 blocks split:
  (out·in) is a multiple of block_size · scaler_block_size, and under FSDP over n ranks
  out % n == 0 and (out·in) % (block_size · scaler_block_size · n) == 0, since each shard
  is a dim-0 slice of the whole weight's blocks (E514). The storage options that need no
  model (torchao packs uint8; bitsandbytes' uint8 under fully_shard) are the language's
  (E414); bitsandbytes itself is refused until the runtime can hold its bases (E511).
`adapters_step` lowers the section to the `Adapters` step.
"""

from __future__ import annotations

from meshplan.dsl.errors import Span
from meshplan.dsl.patterns import select
from meshplan.dsl.spec import AdaptersSpec, PatternSpec, TPRuleSpec
from meshplan.dsl.styles import STYLES, AdapterCall, placement_of

from ..program import Adapters, Quantize, style_call
from .context import Context
from .patterns import generic, nearest

# Module kinds PEFT's LoRA adapts (nn.Linear, nn.Embedding, transformers' Conv1D); PEFT
# also adapts Conv2d, which no model meshplan plans has.
ADAPTABLE = ("linear", "embedding", "conv1d")
_KIND_WORDS = {"linear": "a Linear", "embedding": "an Embedding", "conv1d": "a GPT-2 Conv1D"}
_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
                "torch.float64": "fp64"}


def model_dtype(ctx: Context) -> str:
    """The dtype the model's parameters are trained in: the one its config declares
    (as the other dtype checks read it), fp32 for a model without one."""
    source = ctx.graph.source
    found = source.dtype if source is not None else None
    return _DTYPE_NAMES.get(str(found), "fp32")


def adapter_dtype(spec: AdaptersSpec, base: str) -> str:
    """The adapters' parameter dtype: the plan's, else their base's (a quantized base's
    compute dtype)."""
    if spec.dtype is not None:
        return str(spec.dtype)
    return str(spec.quantize.compute) if spec.quantize is not None else base


def _touches_parameters(rule: TPRuleSpec) -> bool:
    contract = STYLES[rule.style.name].contract
    return bool(contract.weights) or contract.replicated_params


class AdapterPlacement:
    name = "adapters"

    def apply(self, ctx: Context) -> None:
        spec = ctx.spec.adapters
        if spec is None:
            return
        self._resolve(ctx, spec)
        if ctx.mesh is None:
            return
        tp = ctx.spec.tensor_parallel
        tp_size = ctx.size(tp.on) if tp is not None and tp.on else 1
        if tp_size > 1:
            self._layouts(ctx, spec, tp_size)
        if spec.quantize is not None:
            self._quantized(ctx, spec, tp_size)

    # ------------------------------------------------------------------ targets

    def _resolve(self, ctx: Context, spec: AdaptersSpec) -> None:
        fqns = ctx.graph.fqns()
        tied = {name: group for group in ctx.graph.tied for name in group}
        for pattern in spec.targets:
            found = select(pattern.text, fqns)
            if not found:
                close = nearest(pattern.text, fqns)
                hint = ("did you mean " + " or ".join(f"`{c}`" for c in close) + "?") if close else (
                    f"the model ({ctx.graph.name}) has top-level modules "
                    + ", ".join(f"`{f}`" for f in fqns if "." not in f))
                ctx.error(pattern.span, "E502", f"`{pattern.text}` matches no module of {ctx.graph.name}", hint)
                continue
            reported = False
            for fqn in found:
                if fqn in ctx.adapters:
                    if not reported:
                        first = ctx.adapters[fqn].span
                        ctx.error(pattern.span, "E503", f"`{generic(fqn)}` is matched by two targets lines "
                                  f"(lines {first.line} and {pattern.span.line})",
                                  "make the patterns disjoint, e.g. with `{a,b}` alternatives",
                                  related=((first, "first matched here"),))
                    reported = True
                    continue
                if not reported and not self._adaptable(ctx, pattern, fqn, tied):
                    reported = True
                    continue
                ctx.adapters[fqn] = pattern
        order = {f: i for i, f in enumerate(fqns)}
        ctx.adapters = dict(sorted(ctx.adapters.items(), key=lambda kv: order[kv[0]]))

    @staticmethod
    def _adaptable(ctx: Context, pattern: PatternSpec, fqn: str, tied: dict[str, tuple[str, ...]]) -> bool:
        info = ctx.graph.module(fqn)
        if info.kind not in ADAPTABLE:
            inside = [f for f in ctx.graph.fqns() if f.startswith(fqn + ".")
                      and ctx.graph.module(f).kind in ADAPTABLE]
            leaves = list(dict.fromkeys(f.rsplit(".", 1)[-1] for f in inside))  # model order
            hint = (f"target the layers inside it: `{generic(fqn)}.{{{','.join(leaves)}}}`" if len(leaves) > 1
                    else f"target `{generic(inside[0])}`" if inside
                    else "PEFT's LoRA adapts Linear, Embedding and Conv1D modules; leave this one out")
            ctx.error(pattern.span, "E513", f"`{generic(fqn)}` is {info.type} ({info.kind}): LoRA adapts "
                      "Linear, Embedding and Conv1D modules only", hint)
            return False
        weight = f"{fqn}.weight"
        if weight in tied:
            other = next(n for n in tied[weight] if n != weight)
            ctx.warn(pattern.span, "W108", f"`{weight}` is one tensor with `{other}` (tied weights): the "
                     f"adapter trains for `{generic(fqn)}` alone (exact), but merging it (`plan export "
                     f"--merged`, PEFT's merge_and_unload) adds it to the one tensor, changing `{other}` too",
                     f"keep the adapter unmerged, leave `{generic(fqn)}` out of targets, or untie the "
                     "weights (`tie_word_embeddings = false`)")
        return True

    # ------------------------------------------------------------------ tensor parallel

    def _layouts(self, ctx: Context, spec: AdaptersSpec, tp: int) -> None:
        reported: set[tuple[Span, str]] = set()
        for fqn, pattern in ctx.adapters.items():
            rule = ctx.tp_rules.get(fqn)
            if rule is None or not _touches_parameters(rule):
                continue  # replicated plain parameters, or only the activations converted
            kind = ctx.graph.module(fqn).kind
            make = STYLES[rule.style.name].adapter.get(kind)
            if make is None:
                key = (pattern.span, rule.style.name)
                if key not in reported:
                    reported.add(key)
                    has = [k for k in STYLES[rule.style.name].adapter]
                    ctx.error(pattern.span, "E513",
                              f"`{generic(fqn)}` is {_KIND_WORDS.get(kind, kind)} in `{rule.style.name}`, which "
                              f"has no adapter layout for it"
                              + (f" (it has one for {' and '.join(_KIND_WORDS.get(k, k) for k in has)})"
                                 if has else ""),
                              "leave the module out of targets, or give it a style with an adapter layout "
                              "(colwise, rowwise or replicate on a Linear)",
                              related=((rule.span, "its tensor_parallel rule"),))
                continue
            layout = make(style_call(rule.style))
            self._divides(ctx, spec, fqn, rule, tp, layout.a, layout.b, reported)

    def _divides(self, ctx: Context, spec: AdaptersSpec, fqn: str, rule: TPRuleSpec, tp: int,
                 a: AdapterCall, b: AdapterCall, reported: set[tuple[Span, str]]) -> None:
        """The weight dimensions each adapter call's style shards (its contract on a Linear):
        lora_A is (rank, in), lora_B is (out, rank)."""
        attrs = ctx.graph.module(fqn).attrs
        out, inp = attrs.get("out_features"), attrs.get("in_features")
        if not isinstance(out, int) or not isinstance(inp, int):
            return
        base = placement_of(STYLES[rule.style.name].weight("linear"))
        base_dim = base.dim if base is not None and base.kind == "shard" else None
        # The base's sharded feature: out (dim 0) or in (dim 1); Divisibility checks it.
        base_feature = None if base_dim is None else ("out", "in")[base_dim % 2]
        rank = spec.rank
        for matrix, call, dims in (("lora_A", a, (("rank", rank), ("in", inp))),
                                   ("lora_B", b, (("out", out), ("rank", rank)))):
            placement = placement_of(STYLES[call.style].weight("linear"))
            if placement is None or placement.kind != "shard" or placement.dim is None:
                continue
            what, size = dims[placement.dim % 2]
            if what == base_feature or size % tp == 0:
                continue
            fact = (f"rank {rank}" if what == "rank" else
                    f"{size} {'output' if what == 'out' else 'input'} features")
            span = spec.setting_spans.get("rank", spec.span) if what == "rank" else rule.style.span
            key = (span, what)  # one error for the rank, one per rule for a feature
            if key in reported:
                continue
            reported.add(key)
            ctx.error(span, "E505", f"{fact} of `{generic(fqn)}`'s {matrix} cannot be split {tp} ways: "
                      f"`{rule.style.name}` shards {matrix} ({'rank, in' if matrix == 'lora_A' else 'out, rank'}) "
                      f"along its {'rank' if what == 'rank' else 'features'}",
                      f"use a rank that is a multiple of {tp}" if what == "rank" else None,
                      related=((rule.span, "its tensor_parallel rule"),))

    # ------------------------------------------------------------------ quantized bases

    def _quantized(self, ctx: Context, spec: AdaptersSpec, tp: int) -> None:
        quantize = spec.quantize
        assert quantize is not None
        fsdp = ctx.spec.fully_shard
        n = ctx.size(fsdp.on[-1]) if fsdp is not None and fsdp.on else 1
        storage = spec.setting_spans.get("quantize.storage", quantize.span)
        if quantize.backend == "bitsandbytes":
            # The language knows bitsandbytes' rules (below, and E414), but the runtime holds
            # 4-bit bases with torchao only; FSDP2's fully_shard also drops a Linear4bit's
            # quant_state (bitsandbytes 0.50, measured on 4 gloo ranks).
            ctx.error(spec.setting_spans.get("quantize.backend", quantize.span), "E511",
                      "this runtime holds 4-bit bases with torchao only: nothing runs bitsandbytes' Linear4bit",
                      "use `backend = torchao` (FSDP2 shards its NF4 tensors)")
        if fsdp is not None and quantize.backend == "bitsandbytes" and quantize.storage != "uint8" \
                and quantize.storage != model_dtype(ctx):
            ctx.error(storage, "E514", f"bitsandbytes stores the 4-bit base in {quantize.storage}, but the "
                      f"model's parameters are {model_dtype(ctx)}: FSDP2 shards the packed base beside them "
                      "in one dtype", f"write `storage = {model_dtype(ctx)}`")
        reported: set[Span] = set()
        for fqn, pattern in ctx.adapters.items():
            if pattern.span in reported:
                continue
            info = ctx.graph.module(fqn)
            if info.kind != "linear":
                reported.add(pattern.span)
                ctx.error(pattern.span, "E514", f"`{generic(fqn)}` is {_KIND_WORDS.get(info.kind, info.kind)}: "
                          "only Linear bases are held in NF4", "leave it out of targets, or drop `quantize`",
                          related=((quantize.span, "quantize"),))
                continue
            rule = ctx.tp_rules.get(fqn)
            if tp > 1 and rule is not None and _touches_parameters(rule):
                reported.add(pattern.span)
                ctx.error(rule.style.span, "E514", f"`{generic(fqn)}` has a quantized (NF4) base, which "
                          f"`{rule.style.name}` cannot shard over tp: NF4 bases shard over FSDP only",
                          "leave the quantized modules out of tensor_parallel (FSDP shards them), or drop "
                          "`quantize`", related=((quantize.span, "quantize"), (pattern.span, "the target")))
                continue
            out, inp = info.attrs.get("out_features"), info.attrs.get("in_features")
            if not isinstance(out, int) or not isinstance(inp, int):
                continue
            whole = nf4_problem(out, inp, quantize.block_size, quantize.scaler_block_size)
            problem = whole or nf4_problem(out, inp, quantize.block_size, quantize.scaler_block_size, n)
            if problem is None:
                continue
            reported.add(pattern.span)
            if whole is None:
                ctx.error(quantize.span, "E514", f"the NF4 base of `{generic(fqn)}` cannot be sharded over "
                          f"`{fsdp.on[-1] if fsdp else ''}` ({n} ranks): {problem}",
                          "FSDP2 splits the quantized weight along its rows, whole scaler blocks per shard: "
                          "use a block_size/scaler_block_size (or FSDP size) that divides, or leave the "
                          "module out of targets",
                          related=((pattern.span, "the target"),))
            else:
                ctx.error(quantize.span, "E514", f"the weight of `{generic(fqn)}` cannot be cut into NF4 "
                          f"blocks: {problem}",
                          "use a smaller block_size or scaler_block_size, or leave the module out of targets",
                          related=((pattern.span, "the target"),))


def nf4_problem(out: int, inp: int, block_size: int, scaler_block_size: int, shards: int = 1) -> str | None:
    """Why an (out, in) weight cannot be held in NF4 and split into `shards` dim-0 chunks
    (what FSDP2 does to it), or None. torchao's `to_nf4` needs the scalers (one per
    block_size values) to fill whole scaler blocks; its split hands each chunk a share of
    every inner tensor, the coarsest being one quantization factor per scaler block."""
    numel = out * inp
    block = block_size * scaler_block_size
    sizes = (f"{out} × {inp} = {numel} values; block_size × scaler_block_size = "
             f"{block_size} × {scaler_block_size} = {block}")
    if numel % block:
        return f"{sizes}, which does not divide it"
    if shards > 1 and out % shards:
        return f"its {out} rows cannot be split {shards} ways"
    if shards > 1 and numel % (block * shards):
        return f"each of {shards} shards would not hold whole NF4 scaler blocks ({sizes})"
    return None


def adapters_step(ctx: Context) -> Adapters | None:
    """The section as a step, adapted modules in model order (None: nothing to adapt)."""
    spec = ctx.spec.adapters
    if spec is None or not ctx.adapters:
        return None
    q = spec.quantize
    quantize = Quantize(format=q.format, backend=q.backend, compute=q.compute, storage=q.storage,
                        block_size=q.block_size, scaler_block_size=q.scaler_block_size) if q else None
    return Adapters(fqns=tuple(ctx.adapters), method=spec.method, rank=spec.rank, alpha=spec.alpha,
                    dropout=spec.dropout, dtype=spec.dtype, quantize=quantize, span=spec.span)
