"""transformers' own TP plans, audited on a representative subset of families.

Each family's tiny model (its config class's defaults made tiny), its plan written by
`plan import hf`, compiled at world 4 and measured on 4 gloo ranks (`tests/truth_audit.py`,
as `bench/hf_audit.py` does for every family). `EXPECTED` records how far each family
gets and what it measured: a plan meshplan cannot write yet (`import`), the compiler's
verdict and the truth. The compiler must agree with the truth except where the row says
it does not yet (the known disagreements of `tests/plans/truth.json`).
"""

from __future__ import annotations

import pytest

from tests.distributed import RankPool, rank_pool_fixture
from tests.truth_audit import WORLD, audit_family

pytestmark = pytest.mark.slow

pool = rank_pool_fixture(WORLD, timeout=180.0)

# family → (stage, compiler verdict, truth); "-" where the stage stops earlier.
EXPECTED: dict[str, tuple[str, str, str]] = {
    "llama": ("truth", "accept", "exact"),
    "qwen3": ("truth", "accept", "exact"),
    "gemma": ("truth", "accept", "exact"),  # tied head, sharded on the vocabulary: re-tied
    "phi": ("truth", "accept", "exact"),
    "phi3": ("truth", "accept", "exact"),  # fused qkv/gate_up gathered whole
    "glm": ("truth", "accept", "exact"),
    "gpt_neox": ("truth", "accept", "exact"),  # per-head query_key_value, plain colwise
    "olmo2": ("truth", "accept", "exact"),
    "cohere": ("truth", "accept", "exact"),
    "diffllama": ("truth", "accept", "exact"),
    # transformers' own plan trains wrong, and the compiler says so:
    "doge": ("truth", "reject E506", "wrong"),  # k_norm over a sharded dim
    "apertus1p5_text": ("truth", "reject E506", "wrong"),  # xIELU's alpha on sharded activations
    # q/k norms after the transpose: their heads are on dim 1, which the importer reads
    "exaone4": ("truth", "accept", "exact"),
    "gemma3_text": ("truth", "accept", "exact"),
    # qkv_proj viewed into (groups, 3·d) first: per group, not part-major; plain colwise is exact
    "codegen": ("truth", "accept", "exact"),
    # biased k_proj under rotary; its default dropout (0.1) is off in tiny configs
    "seed_oss": ("truth", "accept", "exact"),
    # fused experts split on their intermediate features over tp (`tp_experts`)
    "mixtral": ("truth", "accept", "exact"),
    "qwen2_moe": ("truth", "accept", "exact"),  # a shared expert beside them
    "qwen3_moe": ("truth", "accept", "exact"),
    "deepseek_v3": ("truth", "accept", "exact"),  # sigmoid routing, shared experts
    "nemotron_h": ("truth", "accept", "exact"),  # no gate: up_proj cut as one part
    # gate_up_proj cut as one block (`colwise`): rank 0 gets gate rows, rank 1 up rows
    "inkling2_text": ("truth", "reject E504", "wrong"),
    # a router that samples in training: each tp rank sums partial outputs of its own routes
    "phimoe": ("truth", "reject E504", "wrong"),
    # latent attention: the shared rotary key's gradient summed over tp (`mla_kv_a`);
    # without the rule both are measured wrong and rejected (tests/test_import_hf.py)
    "minicpm3": ("truth", "accept", "exact"),
    "deepseek_v2": ("truth", "accept", "exact"),  # complex rotary, tp_experts
    # experts stored transposed ([E, H, 2I], `packed_rowwise` in transformers' plan)
    "aria_text": ("truth", "accept", "exact"),
    # Llama-4 adds the routed output in place to the shared expert's rowwise output, a view
    # of `to_local`'s result: autograd refuses it on every rank, and the dry-run net says so
    "llama4_text": ("truth", "reject E601", "crash"),
    # the shared experts summed over tp (`all_reduce`) are tp_experts too; the routed ones are
    # cut as one block, as inkling2's (E504); torch's RowwiseParallel cannot cut its embedding,
    # which holds a norm inside (a parameter name with a dot)
    "inkling_text": ("truth", "reject E504", "crash"),
    # a per-head gate bias in attention, sharded with the heads (`local_params` → head_params)
    "beam": ("truth", "accept", "exact"),
    # attention sinks, one logit per head, sharded with the heads (head_params; meshplan_sdpa
    # applies them as transformers' eager attention does)
    "granite_swa": ("truth", "accept", "exact"),
    "mimo_v2_flash": ("truth", "accept", "exact"),  # sinks on the sliding-window layers only, tp_experts
    # styles with no meshplan equivalent yet
    "longcat_flash": ("import", "-", "-"),  # moe_identity_expert inside tensor-parallel experts
}

# Families whose compiler verdict disagrees with the truth today (none in this subset).
KNOWN_DISAGREEMENTS: frozenset[str] = frozenset()


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family(pool: RankPool, family: str) -> None:
    row, text = audit_family(pool, family)
    stage, compiler, truth = EXPECTED[family]
    assert (row.stage, row.compiler, row.truth) == (stage, compiler, truth), row
    if stage == "import":
        assert text is None
        assert "no meshplan equivalent yet" in row.detail or "not a module" in row.detail
        return
    assert text is not None and text.startswith("# ")
    if stage == "truth" and family not in KNOWN_DISAGREEMENTS:
        assert (compiler == "accept") == (truth == "exact"), row
