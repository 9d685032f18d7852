"""A corpus of broken plans: mistakes users really make, each caught at compile time.

Every file under `tests/plans/broken/` is one small plan with a leading comment saying
what is wrong and why it would hurt. Each case names the model and world size it is
compiled for and the diagnostic the compiler must give: its code, the plan line (and
column) it points at, and a phrase of its message. Unless a case says otherwise, that
diagnostic is the first error (diagnostics are sorted by position), i.e. the one a
user reads first.

Cases marked `primary=False` assert only that the expected diagnostic is among the
errors: there the compiler also reports follow-on errors that sort before it (a known
problem, see the comment at each case).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meshplan.dsl.errors import PlanError, PlanRejected
from meshplan.planner import compile_plan
from meshplan.planner.graph import ModelGraph, build_graph

BROKEN = Path(__file__).resolve().parent / "plans" / "broken"

_GRAPHS: dict[str, ModelGraph] = {}


def graph(model: str) -> ModelGraph:
    """One traced graph per model for the whole module (a preset, or a transformers
    model_type whose defaults are made tiny: `planner.hf_import.hf_source`)."""
    from meshplan.planner.hf_import import hf_source

    if model not in _GRAPHS:
        _GRAPHS[model] = build_graph(hf_source(model))
    return _GRAPHS[model]


@dataclass(frozen=True)
class Case:
    file: str
    model: str
    world: int
    code: str
    line: int | None  # None: the line is wrong today (see the case's comment)
    column: int | None  # None: not asserted
    phrase: str
    hint: str | None = None  # a phrase of the hint, when the hint is the point
    primary: bool = True
    overrides: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.file


CASES: tuple[Case, ...] = (
    # -- divisibility (E505): sizes taken from the model, not from the plan
    Case("kv_heads_tp16", "llama-3.1-8b", 32, "E505", 12, 43,
         "8 key/value heads cannot be split 16 ways", hint="divides both head counts"),
    Case("intermediate_not_divisible", "tiny-llama", 6, "E505", 11, 39,
         "128 output features cannot be split 3 ways"),
    Case("seq_len_not_divisible_sp", "tiny-llama", 8, "E505", 14, 45,
         "sequence length 4097 cannot be split 2 ways for sequence parallelism",
         hint="multiple of 2"),
    Case("seq_len_not_divisible_cp", "tiny-llama", 8, "E505", 16, 1,
         "sequence length 4100 cannot be cut into 2·cp = 8 chunks", hint="multiple of 8"),
    Case("sp_after_cp_not_divisible", "llama-3.1-8b", 16, "E505", 16, 45,
         "each context-parallel rank holds 18 tokens (sequence length 36 / cp 2), which cannot be "
         "split 4 ways", hint="multiple of cp × tp = 8"),
    Case("experts_not_divisible", "tiny-mixtral", 6, "E505", 16, 11, "4 experts cannot be split 3 ways"),
    # -- layouts (E506/E507): what flows between planned modules
    Case("rowwise_after_replicated", "tiny-llama", 4, "E506", 12, 3,
         "`model.layers.*.mlp.down_proj` declares its input sharded on dim 2 but receives replicated"),
    Case("o_proj_forgotten", "tiny-llama", 4, "E506", 11, 3,
         "a projection with no rule gets its input sharded over the features it contracts",
         hint="rowwise"),
    Case("partial_never_reduced", "tiny-llama", 4, "E507", 13, 3,
         "`add` adds a replicated value to a partial sum"),
    Case("logits_local_shards", "tiny-llama", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor)", hint="local_output = false"),
    Case("embedding_default_input", "tiny-llama", 4, "E506", 12, 3,
         "`model.embed_tokens` declares its input sharded on dim 1 but receives replicated"),
    Case("norm_left_out_of_sp", "tiny-llama", 4, "E506", 13, 3,
         "`model.layers.*.post_attention_layernorm`'s weight is applied to a value sharded on dim 1",
         hint="sequence_parallel"),
    Case("residual_add_sharded", "tiny-llama", 4, "E506", 13, 3,
         "`add` combines a value sharded on dim 1 with a replicated one"),
    # The mistake is line 14 (post_*_layernorm without local_output = true), but the
    # error points at line 12, the origin of the *other* operand (bug in the report).
    Case("gemma2_post_norm_dtensor", "tiny-gemma2", 4, "E506", None, None,
         "`add` in `model.layers.*` mixes a DTensor (made by this line) with a plain tensor"),
    # q/k norms without a rule: found; (the hint suggests sequence_parallel, which is
    # wrong for a per-head norm: not asserted, see the report).
    Case("qwen3_qk_norm_without_rule", "tiny-qwen3", 4, "E506", 12, 3,
         "`model.layers.*.self_attn.q_norm`'s weight is applied to a value sharded on dim 2"),
    # -- style fit (E504)
    Case("shard_dim_out_of_range", "tiny-llama", 4, "E504", 11, 39,
         "`output = shard(3)`: the output of `model.layers.0.mlp.gate_proj` (and 3 more) has 3 dimensions",
         hint="from -3 to 2"),
    Case("colwise_on_conv1d", "tiny-gpt2", 4, "E504", 11, 32,
         "`colwise` is made for a Linear and an Embedding; `transformer.h.0.mlp.c_fc` (and 1 more) is Conv1D",
         hint="use `conv1d_colwise`"),
    Case("colwise_on_norm", "tiny-llama", 4, "E504", 11, 36,
         "`colwise` is made for a Linear and an Embedding; `model.layers.0.input_layernorm`",
         hint="norms take `sequence_parallel`"),
    # The E504 is right, but a follow-on E506 at the section header (line 11) sorts first.
    Case("sequence_parallel_on_linear", "tiny-llama", 4, "E504", 12, 34,
         "`sequence_parallel` is made for a norm; `model.layers.0.mlp.gate_proj` (and 1 more) is Linear",
         hint="projections take colwise or rowwise", primary=False),
    # Fused projections: the E504 (with the `parts = N` fix) is right; a follow-on E506
    # on the same line sorts first because it points at the rule, not the style.
    Case("fused_qkv_plain_colwise", "tiny-phi3", 4, "E504", 11, 39,
         "is a fused projection of 3 parts", hint="colwise(parts = 3)", primary=False),
    Case("fused_gate_up_plain_colwise", "tiny-phi3", 4, "E504", 12, 37,
         "`model.layers.0.mlp.gate_up_proj` (and 1 more) is a fused projection of 2 parts (128 + 128 features)",
         hint="colwise(parts = 2)", primary=False),
    Case("gpt2_c_attn_without_parts", "tiny-gpt2", 4, "E504", 11, 33,
         "`transformer.h.0.attn.c_attn` (and 1 more) is a fused projection of 3 parts",
         hint="conv1d_colwise(parts = 3)", primary=False),
    Case("colwise_parts_on_plain", "tiny-llama", 4, "E504", 11, 37,
         "`parts = 3`: `model.layers.0.self_attn.q_proj` (and 1 more) has 64 output features, not 3 equal parts",
         primary=False),
    Case("tied_sharded_differently", "llama-3.2-1b", 8, "E504", 12, 3,
         "`model.embed_tokens.weight` and `lm_head.weight` are one tied tensor, but the plan shards it "
         "as shard(0) under one name and replicate under the other"),
    Case("cp_on_mlp", "tiny-llama", 4, "E504", 18, 13, "`model.layers.0.mlp` is LlamaMLP (mlp), not an attention module"),
    # -- patterns (E502/E503)
    Case("pattern_typo", "tiny-llama", 4, "E502", 11, 3,
         "`model.layers.*.attn.{q,k,v}_proj` matches no module of tiny-llama",
         hint="`model.layers.*.self_attn.q_proj`"),
    Case("unit_matches_nothing", "tiny-llama", 4, "E502", 10, 8, "`model.h.*` matches no module of tiny-llama",
         hint="`model.layers.*`"),
    # The E503 is right, but follow-on E506s from the first rule sort before it (line
    # 11), and the E503 is repeated once per layer.
    Case("two_rules_one_module", "tiny-llama", 4, "E503", 12, 3,
         "`model.layers.*.self_attn.o_proj` is matched by two tensor_parallel rules (lines 11 and 12)",
         primary=False),
    Case("unit_overlap", "tiny-llama", 4, "E503", 11, 3,
         "`model.layers.*` is matched by two fully_shard units (lines 10 and 11)"),
    Case("nested_checkpoints", "tiny-llama", 4, "E503", 11, 1,
         "`model.layers.0.mlp` is checkpointed inside checkpointed `model.layers.0` (line 10)"),
    # -- mesh (E501) and FSDP (E412/E508/E509)
    Case("mesh_product_wrong", "tiny-llama", 16, "E501", 5, 1,
         "the mesh (dp_replicate 2 × dp_shard 2 × tp 2) has 8 ranks, the world size is 16"),
    Case("auto_not_divisible", "tiny-llama", 8, "E501", 5, 3,
         "`dp_shard = auto` cannot fill the world: 8 ranks are not divisible by the other dimensions' product 3"),
    Case("ep_not_dividing_dp", "tiny-mixtral", 6, "E501", 7, 3, "ep = 4 must divide dp_shard × cp × tp = 6"),
    # -- expert parallelism: each plan's leading comment records its measured truth
    Case("ep_pattern_matches_block", "tiny-mixtral", 4, "E504", 17, 11,
         "matches `model.layers.*.mlp` (MixtralSparseMoeBlock, a moe module), not fused experts"),
    Case("ep_pattern_matches_router", "tiny-qwen3-moe", 4, "E504", 16, 11, "(router), not a block of experts"),
    Case("ep_pattern_typo", "tiny-mixtral", 4, "E502", 16, 11, "`model.layers.*.mlp.expert` matches no module"),
    Case("ep_router_colwise", "tiny-mixtral", 4, "E504", 15, 43,
         "the router `model.layers.*.mlp.gate` (MixtralTopKRouter) cannot be `colwise`", primary=False),
    Case("ep_without_section", "tiny-mixtral", 4, "E509", 7, 3,
         "ep = 2 but the plan has no `expert_parallel` section"),
    Case("ep_moe_in_sp_region", "tiny-mixtral", 4, "E506", 26, 1,
         "the MoE block `model.layers.*.mlp` sits in a sequence-parallel region", primary=False),
    Case("ep_auto", "tiny-mixtral", 4, "E301", 7, 3, "`ep` cannot be `auto`"),
    Case("ep_in_submesh", "tiny-mixtral", 4, "E409", 9, 27, "`ep` lives on its own expert mesh"),
    Case("ep_section_on_dp_shard", "tiny-mixtral", 4, "E411", 14, 20, "`expert_parallel` runs on `ep`"),
    Case("ep_not_declared", "tiny-mixtral", 4, "E207", 13, 20, "`on ep`: no such mesh dimension"),
    Case("ep_experts_colwise", "tiny-qwen3-moe", 4, "E504", 17, 43, "is Qwen3MoeExperts"),
    Case("ep_dispatch_typo", "tiny-mixtral", 4, "E208", 16, 14, "`all2all` is not one of `alltoall` or `allgather`"),
    Case("ep_experts_twice", "tiny-mixtral", 4, "E503", 17, 11,
         "`model.layers.*.mlp.experts` is matched by two experts items (lines 16 and 17)"),
    Case("ep_deepseek_mla_tp", "tiny-deepseek-v3", 4, "E506", 14, 3, "(in `model.layers.*.self_attn`)"),
    Case("fsdp_on_tp", "tiny-llama", 4, "E509", 15, 16, "fully_shard on `tp` overlaps tensor_parallel's `tp`"),
    Case("no_root", "tiny-llama", 4, "E412", 9, 1, "`fully_shard` has no `root`"),
    Case("tied_split_units", "llama-3.2-1b", 8, "E508", 13, 3,
         "`model.embed_tokens.weight` and `lm_head.weight` are one tied tensor but fall in different "
         "FSDP units (lines 11 and 13)", hint="unit lm_head, model.embed_tokens"),
    Case("unit_with_submodule", "tiny-llama", 4, "E508", 10, 3,
         "this unit holds `model.layers.0` and its own submodule `model.layers.0.self_attn`"),
    Case("dp_without_fsdp", "tiny-llama", 8, "E509", 5, 1,
         "nothing averages gradients over dp_shard (4 ranks): the plan has no `fully_shard`"),
    Case("hsdp_replicate_left_out", "tiny-llama", 8, "E509", 11, 1,
         "fully_shard's mesh leaves out dp_replicate (2 ranks)"),
    Case("cp_not_in_fsdp", "tiny-llama", 8, "E509", 10, 1, "fully_shard's mesh leaves out cp (2 ranks)"),
    Case("hsdp_names_reversed", "tiny-llama", 8, "E509", 10, 1, "HSDP replicates parameters over its first mesh name"),
    # -- transformers' own plans with one mistake each, over more families (the models are
    # model_types whose defaults are made tiny: `planner.hf_import.hf_source`)
    Case("olmo2_down_proj_forgotten", "olmo2", 4, "E506", 18, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("olmo2_lm_head_typo", "olmo2", 4, "E502", 12, 3,
         "`lm_heads` matches no module of olmo2"),
    Case("olmo2_no_fsdp", "olmo2", 4, "E509", 6, 1,
         "nothing averages gradients over dp_shard (2 ranks): the plan has no `f"),
    Case("olmo2_local_logits", "olmo2", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("granite_o_proj_forgotten", "granite", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("granite_down_proj_forgotten", "granite", 4, "E506", 18, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("granite_lm_head_typo", "granite", 4, "E502", 12, 3,
         "`lm_heads` matches no module of granite"),
    Case("granite_tp4_kv2", "granite", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("granite_no_fsdp", "granite", 4, "E509", 6, 1,
         "nothing averages gradients over dp_shard (2 ranks): the plan has no `f"),
    Case("granite_local_logits", "granite", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("starcoder2_o_proj_forgotten", "starcoder2", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("starcoder2_down_proj_forgotten", "starcoder2", 4, "E506", 18, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("starcoder2_lm_head_typo", "starcoder2", 4, "E502", 12, 3,
         "`lm_heads` matches no module of starcoder2"),
    Case("starcoder2_tp4_kv2", "starcoder2", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("starcoder2_no_fsdp", "starcoder2", 4, "E509", 6, 1,
         "nothing averages gradients over dp_shard (2 ranks): the plan has no `f"),
    Case("starcoder2_local_logits", "starcoder2", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("cohere_o_proj_forgotten", "cohere", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("cohere_down_proj_forgotten", "cohere", 4, "E506", 18, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("cohere_lm_head_typo", "cohere", 4, "E502", 12, 3,
         "`lm_heads` matches no module of cohere"),
    Case("cohere_tp4_kv2", "cohere", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("cohere_no_fsdp", "cohere", 4, "E509", 6, 1,
         "nothing averages gradients over dp_shard (2 ranks): the plan has no `f"),
    Case("cohere_local_logits", "cohere", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("helium_o_proj_forgotten", "helium", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("helium_down_proj_forgotten", "helium", 4, "E506", 18, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("helium_lm_head_typo", "helium", 4, "E502", 12, 3,
         "`lm_heads` matches no module of helium"),
    Case("helium_tp4_kv2", "helium", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("helium_no_fsdp", "helium", 4, "E509", 6, 1,
         "nothing averages gradients over dp_shard (2 ranks): the plan has no `f"),
    Case("helium_local_logits", "helium", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("smollm3_o_proj_forgotten", "smollm3", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("smollm3_down_proj_forgotten", "smollm3", 4, "E506", 18, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("smollm3_lm_head_typo", "smollm3", 4, "E502", 12, 3,
         "`lm_heads` matches no module of smollm3"),
    Case("smollm3_tp4_kv2", "smollm3", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("smollm3_no_fsdp", "smollm3", 4, "E509", 6, 1,
         "nothing averages gradients over dp_shard (2 ranks): the plan has no `f"),
    Case("smollm3_local_logits", "smollm3", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("mistral_o_proj_forgotten", "mistral", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("mistral_local_logits", "mistral", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("mistral_tp4_kv2", "mistral", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("gemma_o_proj_forgotten", "gemma", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("gemma_local_logits", "gemma", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("gemma_tp4_kv2", "gemma", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("olmo_o_proj_forgotten", "olmo", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("olmo_local_logits", "olmo", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("olmo_tp4_kv2", "olmo", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("exaone4_o_proj_forgotten", "exaone4", 4, "E506", 17, 3,
         "`model.layers.*.self_attn.q_norm` declares its input sharded on dim 2 "),
    Case("exaone4_local_logits", "exaone4", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("exaone4_tp4_kv2", "exaone4", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("seed_oss_o_proj_forgotten", "seed_oss", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("seed_oss_local_logits", "seed_oss", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("seed_oss_tp4_kv2", "seed_oss", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("apertus_o_proj_forgotten", "apertus", 4, "E506", 17, 3,
         "`model.layers.*.self_attn.q_norm` declares its input sharded on dim 2 "),
    Case("apertus_local_logits", "apertus", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("apertus_tp4_kv2", "apertus", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("arcee_o_proj_forgotten", "arcee", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("arcee_local_logits", "arcee", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("arcee_tp4_kv2", "arcee", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("ernie4_5_o_proj_forgotten", "ernie4_5", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("ernie4_5_local_logits", "ernie4_5", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("ernie4_5_tp4_kv2", "ernie4_5", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("internlm3_o_proj_forgotten", "internlm3", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("internlm3_local_logits", "internlm3", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("internlm3_tp4_kv2", "internlm3", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    Case("phi_o_proj_forgotten", "phi", 4, "E506", 14, 3,
         "a projection with no rule gets its input sharded over the features it "),
    Case("phi_local_logits", "phi", 4, "E506", 12, 3,
         "the logits leave the model sharded on dim 2 (plain tensor): the loss w"),
    Case("phi_tp4_kv2", "phi", 4, "E505", 15, 37,
         "2 key/value heads cannot be split 4 ways (`model.layers.*.self_attn.k_"),
    # -- pipeline parallelism: each plan's leading comment says what goes wrong; the
    # measured truth is in tests/plans/truth.json (4-layer stand-ins where a case needs
    # more layers than tiny-llama has)
    Case("pp_microbatches_fewer_than_stages", "tiny-llama", 4, "E512", 9, 1,
         "microbatches = 1 is fewer than pp = 2", hint="at least 2 microbatches"),
    Case("pp_gpipe_two_stages_per_rank", "tiny-llama", 4, "E512", 9, 1, "gpipe runs one stage per rank"),
    Case("pp_zbv_three_stages_per_rank", "tiny-llama", 4, "E512", 9, 1, "zbv runs exactly two stages per rank"),
    Case("pp_split_at_first_layer", "tiny-llama", 4, "E512", 12, 9, "names the first layer"),
    Case("pp_split_count_mismatch", "tiny-llama", 4, "E512", 13, 9,
         "the splits cut `model.layers` into 2 stages, but the schedule runs 4"),
    Case("pp_split_typo", "tiny-llama", 4, "E512", 12, 9, "split `model.layer.1` matches no layer"),
    Case("pp_more_stages_than_layers", "tiny-llama", 4, "E512", 8, 1,
         "4 pipeline stages (pp × virtual_stages) cannot share 2 decoder layers"),
    Case("pp_tied_embedding_across_stages", "tiny-gemma2", 4, "E508", 9, 1,
         "are one tied tensor, but the pipeline puts the embedding on the first stage"),
    Case("pp_without_pipeline_section", "tiny-llama", 4, "E509", 5, 3, "pp = 2 but the plan has no `pipeline` section"),
    Case("pp_not_a_decoder", "tiny-gpt2", 4, "E512", 9, 1, "cannot be cut into pipeline stages"),
    # -- adapters (LoRA, QLoRA): targets, layouts under TP, dtypes per FSDP unit, NF4 bases
    Case("adapters_targets_typo", "tiny-llama", 4, "E502", 12, 11,
         "`model.layers.*.self_attn.{q,v}_prj` matches no module of tiny-llama",
         hint="`model.layers.*.self_attn.q_proj`"),
    Case("adapters_on_norm", "tiny-llama", 4, "E513", 13, 11,
         "`model.layers.*.input_layernorm` is LlamaRMSNorm (norm): LoRA adapts Linear, Embedding and "
         "Conv1D modules only"),
    Case("adapters_on_block", "tiny-llama", 4, "E513", 12, 11,
         "`model.layers.*.self_attn` is LlamaAttention (attention)",
         hint="`model.layers.*.self_attn.{q_proj,k_proj,v_proj,o_proj}`"),
    Case("adapters_embedding_rowwise", "tiny-llama", 4, "E513", 18, 11,
         "`model.embed_tokens` is an Embedding in `rowwise`, which has no adapter layout for it"),
    # PEFT's names for the wrapped modules (`base_layer`, `lora_B`) in a tensor_parallel
    # rule: the rule points at its line and the hint names the base modules.
    Case("adapters_tp_names_base_layer", "tiny-llama", 4, "E502", 15, 3,
         "`model.layers.*.self_attn.{q,k,v}_proj.base_layer` matches no module of tiny-llama",
         hint="PEFT's names inside an adapted module; plans name the base module as the unadapted model has "
              "it (its adapters follow its style): write `model.layers.*.self_attn.{q,k,v}_proj`"),
    Case("adapters_tp_names_lora", "tiny-llama", 4, "E502", 15, 3,
         "`model.layers.*.self_attn.{q,k,v}_proj.lora_B` matches no module of tiny-llama",
         hint="PEFT's names inside an adapted module; plans name the base module as the unadapted model has "
              "it (its adapters follow its style): write `model.layers.*.self_attn.{q,k,v}_proj`"),
    Case("adapters_qlora_under_tp", "tiny-llama", 4, "E514", 11, 43,
         "`model.layers.*.self_attn.q_proj` has a quantized (NF4) base, which `colwise` cannot shard over tp"),
    Case("adapters_nf4_blocks_not_splitting", "tiny-llama", 4, "E514", 14, 3,
         "the NF4 base of `model.layers.*.self_attn.k_proj` cannot be sharded over `dp_shard` (4 ranks): "
         "each of 4 shards would not hold whole NF4 scaler blocks"),
    Case("adapters_bnb_uint8_under_fsdp", "tiny-llama", 4, "E414", 14, 68,
         "bitsandbytes' uint8 storage cannot be sharded by fully_shard", hint="storage = bf16"),
    Case("adapters_bnb_float_storage_under_fsdp", "tiny-llama", 4, "E511", 16, 28,
         "this runtime holds 4-bit bases with torchao only: nothing runs bitsandbytes' Linear4bit",
         hint="use `backend = torchao`"),
    Case("adapters_torchao_float_storage", "tiny-llama", 4, "E414", 12, 63,
         "torchao packs NF4 into uint8; `storage = fp32` is bitsandbytes' option"),
)


def _compile_error(case: Case) -> PlanRejected:
    with pytest.raises(PlanRejected) as info:
        compile_plan(BROKEN / f"{case.file}.plan", graph(case.model), case.world, case.overrides)
    return info.value


def _shown(diagnostics: list[PlanError]) -> str:
    return "\n".join(f"{d}  (hint: {d.hint})" for d in diagnostics)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_broken_plan_is_rejected(case: Case) -> None:
    rejected = _compile_error(case)
    errors = rejected.errors
    assert errors, "rejected without an error"
    path = str(BROKEN / f"{case.file}.plan")
    if case.primary:
        found = errors[0]
    else:
        candidates = [d for d in errors if d.code == case.code and case.phrase in d.message]
        assert candidates, f"no {case.code} with {case.phrase!r} among:\n{_shown(errors)}"
        found = candidates[0]
    shown = _shown(rejected.diagnostics)
    assert found.code == case.code, shown
    assert case.phrase in found.message, shown
    assert found.span.file == path
    if case.line is not None:
        assert found.span.line == case.line, shown
    if case.column is not None:
        assert found.span.column == case.column, shown
    if case.hint is not None:
        assert found.hint is not None and case.hint in found.hint, shown
    # Every diagnostic has a real position in the plan (never line 0 / "<none>").
    assert all(d.span.line >= 1 and d.span.file == path for d in rejected.diagnostics), shown


def test_arch_not_in_header_only_warns() -> None:
    """A Qwen2 model under a plan written for Llama: the rules fit, so only W103."""
    compiled = compile_plan(BROKEN / "arch_not_in_header.plan", graph("tiny-qwen2"), 4)
    assert [(w.code, w.severity) for w in compiled.warnings] == [("W103", "warning")]
    assert compiled.warnings[0].message == (
        "plan `llama_only` is written for LlamaForCausalLM; the model is Qwen2ForCausalLM")
    assert [s.kind for s in compiled.program.steps] == ["fully_shard"] * 3


LOCAL_INTO_REPLICATED = """\
plan local_into_replicated for LlamaForCausalLM

mesh {
  dp_shard = auto
  tp = 2
}

tensor_parallel on tp {
  model.layers.*.mlp.{gate,up}_proj : colwise
  model.layers.*.mlp.down_proj      : colwise
}

fully_shard on dp_shard {
  unit model.layers.*
  root
}
"""


def test_related_lines_name_the_producer(tmp_path: Path) -> None:
    """Layout errors name both plan lines: the consumer and where the value was made (a
    plain local shard into a projection that reads it as the whole value)."""
    plan = tmp_path / "local_into_replicated.plan"
    plan.write_text(LOCAL_INTO_REPLICATED, encoding="utf-8")
    with pytest.raises(PlanRejected) as info:
        compile_plan(plan, graph("tiny-llama"), 4)
    first = info.value.errors[0]
    assert (first.code, first.span.line) == ("E506", 10), _shown(info.value.diagnostics)
    assert "(plain tensor)" in first.message and "silently wrong" in first.message
    assert [(span.line, message) for span, message in first.related] == [(9, "the value is made here")]


TRUTH = BROKEN.parent / "truth"


@pytest.mark.parametrize("file,line,phrase", [
    ("sp_norm_into_colwise", 15,
     "`model.layers.*.self_attn.{q,k,v}_proj` declares its input replicated but receives sharded on dim 1 "
     "(DTensor): DTensor redistributes it implicitly, a collective on every call"),
    ("sp_output_into_replicated_lm_head", 23,
     "`lm_head` declares its input replicated but receives sharded on dim 1 (DTensor)"),
])
def test_implicit_dtensor_redistribution_is_a_warning(file: str, line: int, phrase: str) -> None:
    """A DTensor in another layout than the style declares is redistributed by the style:
    measured exact (tests/plans/truth.json), so accepted with a performance warning."""
    compiled = compile_plan(TRUTH / f"{file}.plan", graph("tiny-llama"), 4)
    [warning] = [w for w in compiled.warnings if w.code == "W106"]
    assert warning.severity == "warning" and warning.span.line == line
    assert phrase in warning.message
    assert warning.hint is not None and "prepare_input" in warning.hint


def test_divisibility_reports_once_per_line() -> None:
    """126 layers sharing one rule give one error, not 126."""
    rejected = _compile_error(Case("kv_heads_tp16", "llama-3.1-405b", 32, "E505", 12, 43, ""))
    assert [(d.code, d.span.line, d.message) for d in rejected.diagnostics] == [
        ("E505", 12, "8 key/value heads cannot be split 16 ways (`model.layers.*.self_attn.k_proj`)"),
    ]


def test_corpus_is_complete() -> None:
    """Every broken plan has a case (and a leading comment), every case a plan."""
    files = {p.stem for p in BROKEN.glob("*.plan")}
    cased = {c.file for c in CASES} | {"arch_not_in_header"}
    assert files == cased
    assert len(files) >= 35
    for path in BROKEN.glob("*.plan"):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# "), f"{path.name} lacks a leading comment"


@pytest.mark.parametrize("file,model", [
    ("phi3_hf", "tiny-phi3"),  # qkv_proj and gate_up_proj: colwise(output = replicate)
    ("glm4_hf", "glm4"),  # gate_up_proj: colwise(output = replicate)
    ("gpt_neox_hf", "gpt_neox"),  # per-head query_key_value: plain colwise
])
def test_measured_exact_fused_projections_are_accepted(file: str, model: str) -> None:
    """Measured exact on 4 gloo ranks (tests/plans/truth.json): gathering a fused
    projection's whole output restores the packed order, and a per-head projection
    under plain colwise hands each rank whole heads."""
    compiled = compile_plan(TRUTH / f"{file}.plan", graph(model), 4)
    assert [w for w in compiled.warnings if w.severity == "error"] == []


def test_parts_on_a_per_head_projection_is_rejected() -> None:
    """GPT-NeoX with `parts = 3`: measured wrong (rows of other heads); the layout walk
    sees the projection viewed into heads before it is cut."""
    with pytest.raises(PlanRejected) as info:
        compile_plan(TRUTH / "gpt_neox_qkv_parts3.plan", graph("gpt_neox"), 4)
    first = info.value.errors[0]
    assert (first.code, first.span.line) == ("E506", 16), _shown(info.value.diagnostics)
    assert "splits a fused (3-part) sharded dimension: the projection is laid out per head" in first.message
    assert first.hint is not None and "drop `parts`" in first.hint
