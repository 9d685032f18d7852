"""Long explanations of diagnostic codes, for `plan explain-code CODE`.

One entry per code of `errors.CATALOGUE` (a test holds them in step): what the code
means, a plan that triggers it, and the fix. The one-line title stays in the catalogue;
this is the page behind it, as `rustc --explain` prints.
"""

from __future__ import annotations

from .errors import CATALOGUE

EXPLANATIONS: dict[str, str] = {
    "E101": """\
The text is not a statement of the plan language: a token came where the grammar does
not allow it. The message names what was expected. Brackets nested more than 32 deep
are refused here too.

Example:

    mesh { tp = }

Fix: complete the statement (`mesh { tp = 2 }`). A rule is `PATTERN : STYLE`, several
dimensions are `on (A, B)`, and names are letters, digits and `_`.
""",
    "E102": """\
A character that no token of the language contains: control characters, a NUL byte,
quotes other than `"`, or a stray symbol. Diagnostics show invisible characters escaped
(`\\u{1b}`), so you can see what is there.

Example:

    param tp = 4 ?

Fix: delete the character; strings are written in double quotes on one line.
""",
    "E103": """\
The file ends inside a statement, most often a `{` that is never closed. The hint names
the line of the open brace.

Example:

    mesh {
      tp = 2

Fix: close the section with `}` (or finish the statement).
""",
    "E104": """\
The plan file cannot be read: it does not exist, is a directory, is not readable, or is
not UTF-8 text. For bad bytes the diagnostic points at the first one (line, column and
byte offset).

Example: a plan saved as Latin-1 with `plan café for X`.

Fix: save the plan as UTF-8 (`iconv -f latin1 -t utf-8`), or give the right path.
""",
    "E105": """\
A module pattern is malformed: an empty segment (`model..layers`), `**` inside a
segment, an empty `{}` alternative, or `**.**`.

Example:

    activation_checkpoint model.layers**.mlp { mode = full }

Fix: `*` matches within one segment, `**` is a whole segment of its own
(`model.layers.**.mlp`), `{a,b}` lists non-empty alternatives.
""",
    "E201": """\
A section keyword the language does not know.

Example:

    mesh { tp = 2 }
    tensor_paralel on tp {
      model.layers.*.mlp.down_proj : rowwise
    }

Fix: use one of the sections: tensor_parallel, activation_checkpoint, fully_shard,
context_parallel, expert_parallel, pipeline, adapters, packing (plus mesh, submesh, param,
plan).
""",
    "E202": """\
A tensor-parallel rule names a style that is not registered.

Example:

    tensor_parallel on tp {
      model.layers.*.self_attn.q_proj : colwsie
    }

Fix: use a registered style (`colwise`, `rowwise`, `sequence_parallel`,
`prepare_input`, `prepare_output`, `replicate`, `conv1d_colwise`, `conv1d_rowwise`,
`tp_experts`, `mla_kv_a`);
the hint suggests the closest.
""",
    "E203": """\
A style argument, a section setting or an item setting that does not exist there.

Example:

    mesh { tp = 2 }
    tensor_parallel on tp {
      model.layers.*.mlp.down_proj : rowwise(outptu = shard(1))
    }

Fix: spell it as the style or section defines it (`output`); the hint lists the
arguments or settings there are.
""",
    "E204": """\
A dtype the language does not know.

Example:

    mesh { dp_shard = auto }
    fully_shard on dp_shard {
      mixed_precision { param = bf61 }
      root
    }

Fix: use `bf16`, `fp16`, `fp32` or `fp64`.
""",
    "E205": """\
A placement the language does not know.

Example:

    mesh { tp = 2 }
    tensor_parallel on tp {
      model.embed_tokens : rowwise(output = sharded(1))
    }

Fix: placements are `replicate`, `shard(d)` (d may be negative) and `partial`.
""",
    "E206": """\
The mesh block declares a dimension that does not exist.

Example:

    mesh { dp = 8 }

Fix: dimensions are pp, dp_replicate, dp_shard, cp, tp and ep; a group of dimensions
(like dp) is a `submesh dp = dp_replicate * dp_shard`.
""",
    "E207": """\
`on NAME` names neither a declared mesh dimension nor a submesh.

Example:

    mesh { dp_shard = auto }
    tensor_parallel on tp {
      model.layers.*.mlp.down_proj : rowwise
    }

Fix: declare the dimension in the mesh (`tp = 2`) or define the submesh.
""",
    "E208": """\
A setting that takes one of a few names is given another.

Example:

    packing { algorithm = ffdd, seq_len = 4096 }

Fix: use one of the names the setting takes (here `ffd`, `bfd` or `greedy`); the hint
suggests the closest.
""",
    "E209": """\
`--set NAME=VALUE` names no parameter of the plan, or `--set mesh.DIM=N` a dimension
the mesh does not declare.

Example:

    plan check plans/llama.plan --set tq=2

Fix: use a declared `param` (`--set tp=2`), or `--set mesh.DIM=N` for a declared
mesh dimension.
""",
    "E210": """\
A body holds an item keyword its section does not have.

Example:

    fully_shard on dp_shard {
      units model.layers.*
      root
    }

Fix: use the section's items (`unit`, `root`, `mixed_precision`, `offload` in
fully_shard; `attention` in context_parallel; `experts` in expert_parallel; `split`
in pipeline).
""",
    "E301": """\
A value has the wrong type for where it is used: a name where an integer belongs, an
integer where a placement belongs, `auto` where it is not allowed.

Example:

    activation_checkpoint model.layers.* { every = yes }

Fix: give a value of the type the setting takes (`every = 2`).
""",
    "E302": """\
A `--set` value does not have the parameter's type, or does not parse.

Example:

    plan check plans/llama.plan --set tp=four

Fix: give a value of the declared type (`--set tp=4`).
""",
    "E303": """\
A value is outside its range: a size below 1, a negative count, an integer beyond 64
bits.

Example:

    mesh { tp = 0 }

Fix: sizes are at least 1; use `auto` for the dimension that takes the rest.
""",
    "E304": """\
A `--set` argument is not `NAME=VALUE`, sets a name twice, or sets one mesh dimension
two ways.

Example:

    plan check plans/llama.plan --set tp

Fix: `--set tp=4`, or `--set mesh.dp_shard=8`; give each name once.
""",
    "E401": """\
A mesh dimension is declared twice.

Example:

    mesh {
      tp = 2
      tp = 4
    }

Fix: keep one declaration; override from the command line with `--set mesh.tp=4`.
""",
    "E402": """\
More than one mesh dimension is `auto`; only one can take what is left of the world
size.

Example:

    mesh {
      dp_shard = auto
      tp = auto
    }

Fix: give every dimension but one a size (or a param).
""",
    "E403": """\
A section (or the mesh) is written twice; for sections that take patterns, twice for
the same modules.

Example:

    mesh { tp = 2 }
    tensor_parallel on tp {
      model.layers.*.self_attn.q_proj : colwise
    }
    tensor_parallel on tp {
      model.layers.*.mlp.up_proj : colwise
    }

Fix: merge the two sections into one.
""",
    "E404": """\
One module pattern has two rules in a section, or is in two FSDP units.

Example:

    tensor_parallel on tp {
      model.layers.*.mlp.down_proj : rowwise
      model.layers.*.mlp.down_proj : colwise
    }

Fix: keep one rule per pattern (one unit per module).
""",
    "E405": """\
A setting or a style argument is given twice, or a single item (`root`,
`mixed_precision`) twice.

Example:

    packing { seq_len = 2048, seq_len = 4096 }

Fix: give it once.
""",
    "E406": """\
A parameter is declared twice.

Example:

    param tp = 4
    param tp = 8

Fix: keep one; override on the command line with `--set tp=8`.
""",
    "E407": """\
Mesh dimensions are declared out of the canonical order pp, dp_replicate, dp_shard, cp,
tp (ep last). The order fixes rank layout, so it is not left to chance.

Example:

    mesh {
      tp = 2
      dp_shard = auto
    }

Fix: declare them in the canonical order (`plan fmt` keeps what you write, so move the
lines).
""",
    "E408": """\
Something the plan needs is missing: the `plan NAME for ARCH` header, or a
declaration a statement refers to.

Example: a file that starts with `mesh { … }`.

Fix: start the file with `plan NAME for LlamaForCausalLM` (the architectures the plan
is written for).
""",
    "E409": """\
A submesh is not a product of distinct declared dimensions in mesh order, or combines
`ep` (which lives on its own expert mesh) with others.

Example:

    submesh fsdp = cp * dp_shard

Fix: `submesh fsdp = dp_shard * cp`: declared dimensions, each once, in mesh order.
""",
    "E410": """\
A submesh is declared twice, or has the name of a mesh dimension.

Example:

    submesh tp = tp

Fix: give each submesh its own name, different from the dimensions.
""",
    "E411": """\
Something valid elsewhere is not allowed here: `on` for a section that takes none,
module patterns where none are taken, conversions on a style that takes keywords,
two names for a section that runs on one dimension.

Example:

    packing on dp { seq_len = 4096 }

Fix: follow the section's form; the hint shows it.
""",
    "E412": """\
A required piece is missing: `fully_shard` without `root`, a section without `on`,
a `context_parallel` with no attention modules, a required setting.

Example:

    fully_shard on dp_shard {
      unit model.layers.*
    }

Fix: add what the hint names (here `root`: FSDP must wrap the whole model last).
""",
    "E413": """\
The file has a second `plan … for …` header.

Example: two plans pasted into one file.

Fix: one plan per file; keep one header.
""",
    "E414": """\
Settings that each have a legal value but cannot go together. For a quantized base
(`adapters { quantize { … } }`): torchao always packs NF4 into uint8, so a float
`storage` is bitsandbytes' option only; and bitsandbytes' uint8 storage cannot be
sharded by fully_shard (FSDP2 treats the packed bytes as numbers: the model trains to a
loss of 0 or NaN, accelerate #3983).

Example:

    mesh { dp_shard = 2 }
    adapters {
      rank = 8
      targets model.layers.*.mlp.down_proj
      quantize { backend = torchao, storage = bf16 }
    }
    fully_shard on dp_shard {
      root
    }

Fix: leave `storage` out for torchao (uint8); with bitsandbytes under fully_shard, store
the packed base in the model's dtype (`storage = bf16`).
""",
    "E501": """\
The mesh does not multiply out to the world size (or the expert mesh does not fit in
the ranks it is carved from).

Example: `mesh { dp_shard = 3, tp = 2 }` compiled with `--world-size 8`.

Fix: make the product equal the world size; let one dimension be `auto`, or pass
`--set mesh.DIM=N`.
""",
    "E502": """\
A module pattern matches no module of the model, so the rule would silently do
nothing.

Example:

    tensor_parallel on tp {
      model.layers.*.attn.q_proj : colwise      # the module is self_attn
    }

Fix: use the model's module names (`model.named_modules()`); the hint suggests close
ones.
""",
    "E503": """\
Rules overlap in a way that cannot be applied: two rules give one module different
treatments in one section, or a checkpoint would recompute something that must not
be recomputed (router noise that would send tokens to other experts).

Example: `model.layers.*.mlp.* : colwise` beside `model.layers.*.mlp.down_proj : rowwise`.

Fix: make the patterns disjoint, or follow the hint.
""",
    "E504": """\
A style does not fit the module it is applied to: `colwise` on a norm,
`sequence_parallel` on a Linear, `colwise` on GPT-2's transposed Conv1D, experts that
are not fused 3-D weights; `tp_experts` whose `parts` does not match how gate_up_proj
packs gate and up, on experts that are also expert-parallel, or behind a router that
draws noise in training (each tp rank would sum partial outputs of its own routes).

Example:

    model.layers.*.input_layernorm : colwise

Fix: use the style for that module kind (`sequence_parallel` for norms,
`conv1d_colwise` for Conv1D).
""",
    "E505": """\
A size the plan shards does not divide by the number of ranks: features, vocabulary,
attention or key/value heads, sequence length, experts.

Example: tp 16 on Llama-3.1-8B, whose 8 key/value heads cannot be split 16 ways.

Fix: choose a size that divides (`--set tp=8`), or change the sequence length to a
multiple of what sequence/context parallelism split it into.
""",
    "E506": """\
Layouts do not flow: propagating each style's output along the traced graph, some
consumer receives a value in the wrong layout. The plan would run and train the
wrong thing; the message names both plan lines.

Example: removing the `post_attention_layernorm : sequence_parallel` rule from the
Llama plan. The norm then runs on sequence-sharded plain tensors and its weight
gradients are never summed across the tensor-parallel ranks, so the replicas drift.

Fix: give the module between planned ones a rule (`sequence_parallel` for a norm) or
convert the layout before it (`prepare_input(shard(1) -> replicate)`).

The same code covers gradients that nothing sums: a replicated value made from weights
and broadcast over a sharded dimension (latent attention's rotary key, shared by every
head, expanded into head-sharded keys) gets on each rank the gradient of that rank's
heads only. For DeepSeek-V2/V3-style attention the fix is
`kv_a_proj_with_mqa : mla_kv_a(rope = N)` (N the config's qk_rope_head_dim), which sums
that part's gradient over the ranks — and is refused where nothing head-sharded shares
it, since the sum would then count the gradient tp times.
""",
    "E507": """\
A `partial` value (a sum each rank holds a piece of) reaches something non-linear, or
the output, without being reduced.

Example: a rowwise projection with `output = partial` feeding an activation.

Fix: let the style reduce it (`output = replicate` or `shard(-1)` on the last
projection).
""",
    "E508": """\
The FSDP units do not form a valid structure: units that do not nest, tied weights
split across units, a float32 router inside a unit of another dtype, adapters of another
dtype than the parameters beside them (`adapters { dtype = fp32 }` on a bf16 model) in a
unit without `mixed_precision { param = … }`, a root missing.

Example: `lm_head` and `model.embed_tokens` in different units while the model ties
their weights.

Fix: put tied modules in one unit; give modules of another dtype a unit of their own, or
give fully_shard a `mixed_precision { param = … }` that casts the unit to one dtype.
""",
    "E509": """\
Two uses of the mesh overlap that must be disjoint, e.g. FSDP sharding over a
dimension tensor parallelism already uses.

Example:

    mesh { tp = 2 }
    tensor_parallel on tp {
      model.layers.*.mlp.up_proj : colwise
    }
    fully_shard on tp {
      root
    }

Fix: FSDP shards over data-parallel dimensions (`fully_shard on dp_shard`, or
`on (dp_replicate, fsdp)` for HSDP).
""",
    "E510": """\
The model cannot be used with this plan: it cannot be traced, or lacks what a section
needs.

Example: a `--model` factory that returns a model torch.export cannot trace.

Fix: the message says what failed; check the model builds on the meta device.
""",
    "E511": """\
The plan asks for a feature the language checks but this runtime cannot run yet.

Example: a style or section the compiler knows but `apply()` has no step for.

Fix: set that dimension to 1, or leave the section out for now.
""",
    "E512": """\
The pipeline section asks for a schedule that cannot run on this cut: the wrong number of
stages per rank for the schedule (gpipe and 1f1b run one, zbv exactly two), fewer
microbatches than pipeline ranks (torch's schedules refuse them on the first step while
the other stages wait for work that never comes), more stages than decoder layers, split
points that do not name layers, or a model that is not a decoder that can be cut.

Example:

    pipeline on pp { schedule = 1f1b  microbatches = 1 }     # with pp = 2

Fix: use at least pp microbatches, the schedule's number of `virtual_stages`, and split
points `model.layers.N` with N ≥ 1.
""",
    "E513": """\
A `targets` module cannot carry a LoRA adapter as planned: PEFT adapts Linear,
Embedding and Conv1D modules only (not an attention block, a norm or an activation); the
module's weight is tied to another module's (the adapter trains for one name, but merging
it into the one tensor changes the other module too); or, under tensor parallelism, the
module's style has no adapter layout for its kind (the style registry's `adapter`:
colwise, rowwise and replicate have one on a Linear; a colwise or rowwise Embedding, the
Conv1D styles and sequence_parallel do not). A prepare_input or prepare_output rule on
the module is fine: it converts the activations, which base and adapter share.

Example:

    adapters {
      rank = 8
      targets model.layers.*.self_attn        # the block, not its projections
    }

Fix: target the projections (`model.layers.*.self_attn.{q,k,v,o}_proj`); leave tied
modules and modules in a style without adapter layout out of targets.
""",
    "E514": """\
A quantized (NF4, QLoRA) base does not fit the rest of the plan: only Linear bases are
held in NF4; a tensor-parallel style cannot shard an NF4 base (NF4 bases shard over FSDP
only); bitsandbytes' float storage must be the model's dtype under fully_shard; and the
weight must split into whole NF4 blocks. NF4 quantises blocks of `block_size` values with
one scaler each, and `scaler_block_size` scalers share a scale: out·in must be a multiple
of block_size · scaler_block_size, and under FSDP over n ranks (which splits the weight
along its rows, each shard a slice of the whole weight's blocks) out % n == 0 and
out·in % (block_size · scaler_block_size · n) == 0.

Example: `quantize { … }` with `fully_shard on dp_shard` at dp_shard = 3 on a model
whose projections have 64 rows.

Fix: leave the quantized modules out of tensor_parallel; choose an FSDP size (or a
block_size / scaler_block_size) that divides; or leave the module out of targets.
""",
    "E601": """\
`plan explain` applies the compiled Program to a meta-device copy of the model on a
fake process group and runs one step; the model failed there. The diagnostic sits on
the plan line whose step touched the failing module, and names the module and the
error.

Example: a `prepare_input` conversion that hands a module a layout its code cannot
handle (a reshape of a sharded dimension that does not divide).

Fix: the message names the module; change the rule for it (or its neighbours), then
run `plan explain` again. `--debug` shows the traceback.
""",
    "W101": """\
A parameter is declared but never used (`seq_len` is exempt: the compiler reads it).

Example:

    param unused = 3

Fix: use it, or delete it.
""",
    "W102": """\
A mesh dimension is greater than 1 but nothing uses it, so its ranks compute the same
thing (or a dimension of size 1 is given work that does nothing).

Example: `tp = 4` with no `tensor_parallel` section.

Fix: add the section, or set the dimension to 1.
""",
    "W103": """\
The model is not one of the architectures the plan's header names. The plan may still
fit, but it was not written for it.

Example: `plan llama for LlamaForCausalLM` compiled with `--model gpt2`.

Fix: use a plan written for the model, or add its architecture to the header once the
plan is checked against it.
""",
    "W104": """\
The pipeline's stages hold very different shares of the parameters: every microbatch
waits for the heaviest stage, so the others idle.

Example: 8 layers over 4 stages split at `model.layers.1`, `model.layers.2`, `model.layers.3`.

Fix: move the split points; the first and last stages (embedding, head) may take fewer layers.
""",
    "W105": """\
An FSDP unit frees its parameters after forward although the model is pipelined: it then
all-gathers them again for every microbatch, in forward and in backward.

Example: `unit model.layers.* { reshard_after_forward = true }` with pp > 1.

Fix: `reshard_after_forward = false` for pipelined training when memory allows.
""",
    "W106": """\
A styled module receives a DTensor in another layout than its plan line declares.
DTensor knows the value's layout and the style redistributes it, so the result is
right — but it costs a collective (an all-gather or a reduction) on every call.

Example: a `sequence_parallel` norm whose DTensor output (shard(1)) flows into a
`colwise` projection declared `input = replicate`, with no `prepare_input` between.

Fix: declare the conversion once where it happens (`prepare_input` on the enclosing
module), or declare the layout the value really has.
""",
    "W107": """\
A size the plan shards does not divide by the tensor-parallel size, at a module whose code
never sees the shard (a colwise projection that gathers its output, a rowwise one that
slices a whole input, a vocabulary-parallel embedding): DTensor gives the first ranks one
row more. The result is exact (measured on GPT-2's odd vocabulary); the ranks are unevenly
loaded.

Example: `transformer.wte : rowwise(input = replicate)` at tp = 2 with 50257 tokens.

Fix: pad the size (e.g. the vocabulary) to a multiple of the tp size for an even split.
""",
    "W108": """\
An adapter on a module whose weight is tied to another module's (a head tied to the
embedding). Training is exact: the adapter is its own pair of matrices beside the frozen
shared weight (measured on 4 ranks). Merging it into the base (`plan export --merged`,
PEFT's merge_and_unload) would add it to the one shared tensor, so the other name would
change too.

Example: `targets lm_head` on a model with `tie_word_embeddings = true`.

Fix: keep the adapter unmerged (`plan export --adapter`), leave the module out of
targets, or untie the weights.
""",
    "W201": """\
Some parameters do not divide evenly over the ranks they are sharded on: ranks hold
shards of different sizes. FSDP pads every shard to the largest, so every rank stores
and communicates the padding.

Example: a vocabulary of 50,257 rows sharded over 8 ranks.

Fix: choose a size for the dimension that divides the sharded sizes, or pad the
vocabulary to a multiple of it.
""",
    "W202": """\
Some ranks hold no element of a parameter: it has fewer rows along its sharded
dimension than there are ranks. They still store the padded shard and join every
collective.

Example: a norm weight of 64 elements under FSDP over 128 ranks.

Fix: shard such parameters over fewer ranks (a smaller FSDP dimension, or HSDP).
""",
    "W203": """\
A dimension of size 1 still issues collectives: work and latency for nothing.

Example: `fully_shard on (dp_replicate, dp_shard)` with dp_replicate = 1 runs a
replicate all-reduce per FSDP unit.

Fix: drop the size-1 dimension from the section's `on` (a 1-D FSDP mesh issues no
replicate all-reduce).
""",
    "W204": """\
The estimated peak memory of some ranks exceeds `--gpu-memory`. The hint names the
largest part and what lowers it. With `--fail-over-budget`, `plan explain` exits 1.

Example:

    plan explain plans/llama.plan --model llama-3.1-70b --world-size 8 --gpu-memory 80GiB

Fix: shard over more ranks, checkpoint more blocks, lower `--micro-batch`, store
parameters in bf16 (`--param-dtype bf16`), or split the sequence.
""",
    "W205": """\
`plan explain` accounts for a pipeline per stage and per pipeline rank (the `Pipeline
stages` tables; `pipeline` in `--json`; `--rank R` shows R's stages and communication):
parameters, gradients, optimizer states, activations with the microbatches the schedule
keeps in flight, FSDP buffers and traffic, tensor-parallel collectives over the stage's
layers and microbatches, the bubble and the point-to-point bytes at each boundary. This
warning names what those figures still leave out, when the plan has it:

- the zero-bubble schedules (`interleaved_zero_bubble`, `zbv`) run each microbatch's
  weight gradients after its input gradients; the inputs of those matmuls stay alive
  until then, longer than the activations counted (freed at the input gradients);
- context-parallel traffic is that of a rank holding every stage, for one microbatch.

Example: `pipeline on pp { schedule = zbv  virtual_stages = 2 ... }`.

Fix: none needed to train; read the activations as a lower bound, and a stage's
context-parallel traffic as its share of the layers times the microbatches.
""",
}


def explain(code: str) -> str | None:
    """The page for `code` (case-insensitive), its title first; None for unknown codes."""
    key = code.strip().upper()
    if key not in CATALOGUE or key not in EXPLANATIONS:
        return None
    title = f"{key}: {CATALOGUE[key]}"
    return f"{title}\n\n{EXPLANATIONS[key]}"
