"""4-bit frozen bases for QLoRA: torchao's NF4Tensor under FSDP2.

The life of a quantised base weight (an `Adapters` step with `quantize`):

    model = meta_model(...)                   # plain parameters on meta
    apply(program, model)                     # the Adapters step: PEFT injects the
                                              #   adapters, then `quantize_bases(model,
                                              #   step)` makes each adapted module's base
                                              #   weight an NF4 placeholder (still meta);
                                              # FullyShard: FSDP2 chunks it along dim 0
    materialize(applied)                      # to_empty: the shards' storage
    load_sharded / load_broadcast / init_random
                                              # per NF4 weight: its FULL tensor, one
                                              #   weight at a time, to `store_quantized`

`store_quantized` quantises the full weight with `to_nf4` and keeps this rank's dim-0
chunk. Why the full weight: NF4 double-quantises its block scalers around their mean
(`scaler_mean`, one number per tensor), and torchao's FSDP2 all-gather gathers the
packed data, the int8 scalers and their factors but reuses the LOCAL shard's
`scaler_mean` for the whole gathered tensor. Shards quantised alone each carry their own
mean, so every rank would dequantise the other ranks' rows with the wrong mean (and the
ranks would disagree); chunks of one full quantisation all carry the full tensor's mean,
so the gathered tensor is exactly the single-process quantisation.

How a shard is written: NF4's `copy_` from a plain tensor would quantise the local rows
alone, so the chunk's inner tensors are written instead. `to_empty` allocates a shard's
data, scalers and factors but leaves its mean and code table on meta: such a shard is
replaced by the new chunk (the DTensor's local tensor, which FSDP2 all-gathers from);
a shard with values is overwritten in place, because FSDP2's unsharded NF4 tensor,
built at the first all-gather, keeps that shard's `scaler_mean` tensor.

The matmul: `NF4Linear` (the class the base `nn.Linear` becomes) dequantises the weight
to the compute dtype (`linear_nf4`) and multiplies the input cast to that dtype; the base
never requires a gradient. The NF4 tensor's own dtype is the compute dtype, so its
factors, mean and code table are held in it: `runtime.explain.sizes.nf4_bytes(numel,
block_size, scaler_block_size, itemsize=<the compute dtype's>)` is what one weight (or
one FSDP2 shard of it) allocates.

Limits: the weight is 2-D with `in * out` divisible by `block_size * scaler_block_size
* shards` and `out` by `shards` (the compiler's rule, `planner.passes.adapters.nf4_problem`);
the only placements are FSDP2's (`Shard(0)` on one mesh dimension, `Replicate` on the
others: FSDP or HSDP), so a quantised base cannot be tensor-parallel. Only torchao's
backend is implemented here. Memory: while storing one weight a rank holds it whole (in
its source and compute dtypes) and `to_nf4`'s intermediates (one float per value, plus
1-M-value chunks of 16), one weight at a time; afterwards only its chunk. Gathered
(`loading.full_state_dict`), a base is the whole NF4Tensor: `get_original_weight()`
dequantises it.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from meshplan.planner.passes.adapters import nf4_problem
from meshplan.planner.program import Adapters, Quantize

__all__ = [
    "NF4Linear",
    "QuantizeError",
    "base_module",
    "is_quantized",
    "quantize_bases",
    "quantized_weight",
    "store_quantized",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# Where torchao keeps the NF4 tensor (torchao 0.18).
NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
# An NF4 tensor's inner tensors: FSDP2 shards and all-gathers the first three; every
# shard holds its own scaler mean and code table.
_INNER = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


class QuantizeError(ValueError):
    """A base weight cannot be held in 4 bits as asked; the message names it."""


def _nf4() -> Any:
    """torchao's NF4 module (imported on first use: torchao is the `adapters` extra)."""
    try:
        import importlib

        return importlib.import_module(NF4_MODULE)
    except ImportError as e:
        raise QuantizeError("quantize { backend = torchao } needs torchao (pip install "
                            "'meshplan[adapters]')") from e


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` (or a DTensor's local shard) is an NF4 tensor. Cheap: without
    torchao's NF4 module imported, no tensor can be one."""
    module = sys.modules.get(NF4_MODULE)
    if module is None:
        return False
    local = tensor._local_tensor if isinstance(tensor, DTensor) else tensor
    return isinstance(local, module.NF4Tensor)


def _problem(shape: tuple[int, ...], block_size: int, scaler_block_size: int, shards: int = 1) -> str | None:
    """Why a weight of `shape` cannot be held in NF4 and cut into `shards` dim-0 chunks
    (the compiler's rule, `nf4_problem`), or None."""
    if len(shape) != 2:
        return f"it has {len(shape)} dimensions (NF4 holds 2-D weights)"
    return nf4_problem(shape[0], shape[1], block_size, scaler_block_size, shards)


def quantized_weight(full: torch.Tensor, quantize: Quantize) -> Any:
    """`to_nf4` of the whole weight `full`, cast to the compute dtype first (so the NF4
    tensor dequantises to it), with the step's block sizes."""
    nf4 = _nf4()
    dtype = DTYPES[quantize.compute]
    return nf4.to_nf4(_own(full.detach().to(dtype)), quantize.block_size, quantize.scaler_block_size)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` contiguous at storage offset 0: an NF4 tensor records its source's offset,
    and FSDP2's unsharded view of a parameter (`as_strided` at offset 0) refuses another."""
    tensor = tensor.contiguous()
    return tensor if tensor.storage_offset() == 0 else tensor.clone()


def _placeholder(shape: torch.Size, quantize: Quantize) -> Any:
    """An NF4 tensor on meta with the inner tensors `to_nf4` of a `shape` weight has:
    FSDP2 chunks it like the real one, and no quantisation runs on meta."""
    nf4 = _nf4()
    dtype, meta = DTYPES[quantize.compute], torch.device("meta")
    numel = shape[0] * shape[1]
    blocks = numel // quantize.block_size
    args = nf4.SubclassTensorArgs(torch.Size(shape), (shape[1], 1), 0, dtype, meta, False)
    return nf4.NF4Tensor(args, quantize.block_size, blocks, quantize.scaler_block_size,
                         torch.empty(blocks, dtype=torch.int8, device=meta),
                         torch.empty(blocks // quantize.scaler_block_size, dtype=dtype, device=meta),
                         torch.empty((), dtype=dtype, device=meta),
                         torch.empty(numel // 2, dtype=torch.uint8, device=meta),
                         torch.empty(16, dtype=dtype, device=meta))


class NF4Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight is an NF4 tensor: the weight is dequantised to
    `compute_dtype` and multiplies the input cast to it; the output has the input's dtype.
    `quantize_bases` turns an adapted module's base `nn.Linear` into one (its class)."""

    compute_dtype: torch.dtype
    source_dtype: torch.dtype  # the plain weight's dtype: loaded values are cast to it first

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        linear_nf4 = _nf4().linear_nf4
        out: torch.Tensor = linear_nf4(input.to(self.compute_dtype), self.weight)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(input.dtype)


def base_module(model: nn.Module, fqn: str) -> nn.Module:
    """The module holding the base weight of the adapted module `fqn`: PEFT's
    `base_layer` once adapters are injected, the module itself before."""
    module = model.get_submodule(fqn)
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Module):  # pragma: no cover - PEFT's base_layer is a module
        raise QuantizeError(f"{fqn}: its base layer is not a module")
    return base


def quantize_bases(model: nn.Module, step: Adapters) -> tuple[str, ...]:
    """Hold the base weight of each module of `step.fqns` in NF4, as `step.quantize` says;
    returns the quantised parameters' names. Does nothing without `step.quantize`.

    Call it on the model before any Parallelize / FullyShard step (the Adapters step),
    after PEFT's injection or before it. On meta the weight becomes an NF4 placeholder
    that the loaders fill (`store_quantized`); a real weight is quantised whole at once."""
    quantize = step.quantize
    if quantize is None:
        return ()
    if quantize.backend != "torchao":
        raise QuantizeError(f"quantize backend {quantize.backend!r}: the runtime holds 4-bit bases "
                            "with torchao only (backend = torchao)")
    if quantize.storage != "uint8":
        raise QuantizeError(f"quantize storage {quantize.storage!r}: torchao packs NF4 into uint8 "
                            "(storage = uint8)")
    names = []
    for fqn in step.fqns:
        base = base_module(model, fqn)
        prefix = f"{fqn}.base_layer" if base is not model.get_submodule(fqn) else fqn
        if not isinstance(base, nn.Linear):
            raise QuantizeError(f"{fqn}: a 4-bit base must be an nn.Linear, not {type(base).__name__}")
        weight = base.weight
        if is_quantized(weight):
            raise QuantizeError(f"{prefix}.weight is already quantised")
        if isinstance(weight, DTensor):
            raise QuantizeError(f"{prefix}.weight is already distributed ({weight.placements}): "
                                "quantise the bases before tensor parallelism and fully_shard")
        problem = _problem(tuple(weight.shape), quantize.block_size, quantize.scaler_block_size)
        if problem is not None:
            raise QuantizeError(f"{prefix}.weight cannot be held in NF4: {problem}")
        tensor = _placeholder(weight.shape, quantize) if weight.is_meta else quantized_weight(weight, quantize)
        base.weight = nn.Parameter(tensor, requires_grad=False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        base.__class__ = NF4Linear  # PEFT's wrapper keeps calling it; only the forward differs
        linear = cast(NF4Linear, base)
        linear.compute_dtype = DTYPES[quantize.compute]
        linear.source_dtype = weight.dtype
        names.append(f"{prefix}.weight")
    return tuple(names)


def _shard_of(param: DTensor, name: str) -> tuple[int, int]:
    """(this rank's chunk index, number of chunks) of an FSDP2-placed NF4 parameter."""
    mesh = param.device_mesh
    shard_dims = []
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, _StridedShard) or (isinstance(placement, Shard) and placement.dim != 0):
            raise QuantizeError(f"{name}: an NF4 weight can only be sharded along dim 0 by FSDP2, "
                                f"not placed {param.placements} (no tensor parallelism on 4-bit bases)")
        if isinstance(placement, Shard):
            shard_dims.append(dim)
        elif not isinstance(placement, Replicate):
            raise QuantizeError(f"{name}: an NF4 weight cannot be placed {param.placements}")
    if len(shard_dims) > 1:
        raise QuantizeError(f"{name}: an NF4 weight can be sharded over one mesh dimension, not "
                            f"placed {param.placements}")
    if not shard_dims:
        return 0, 1
    return mesh.get_local_rank(shard_dims[0]), mesh.size(shard_dims[0])


def store_quantized(module: nn.Module, attr: str, full: torch.Tensor, *, name: str | None = None) -> None:
    """Quantise `full`, the WHOLE weight `module.<attr>` (an NF4 parameter, maybe an FSDP2
    shard), and keep this rank's dim-0 chunk as its value (see the module docstring).

    Holds the full weight in the compute dtype and its quantisation on this rank's device
    for the duration of the call; what stays is only this rank's chunk."""
    nf4 = _nf4()
    label = name or attr
    param = module._parameters[attr]
    if param is None or not is_quantized(param):
        raise QuantizeError(f"{label} is not an NF4 parameter")
    local: Any = param._local_tensor if isinstance(param, DTensor) else param
    if tuple(full.shape) != tuple(param.shape):
        raise QuantizeError(f"{label}: the weight given has shape {list(full.shape)}, the model's "
                            f"is {list(param.shape)}")
    index, chunks = _shard_of(param, label) if isinstance(param, DTensor) else (0, 1)
    problem = _problem(tuple(param.shape), local.block_size, local.scaler_block_size, chunks)
    if problem is not None:
        raise QuantizeError(f"{label} cannot be sharded in NF4 over {chunks} ranks: {problem}")
    # Cast to the plain weight's dtype first: the values are those of the unquantised
    # model's weight (a bf16 model quantises its bf16-rounded weights, whatever `full` is).
    source = getattr(module, "source_dtype", local.dtype)
    with torch.no_grad():
        whole = nf4.to_nf4(_own(full.detach().to(source).to(local.device, local.dtype)),
                           local.block_size, local.scaler_block_size)
        piece = whole.split(param.shape[0] // chunks, 0)[index] if chunks > 1 else whole
        # The chunk's inner tensors are views of the whole tensor's: copy them, so that
        # only this rank's part stays allocated.
        inner = {a: torch.empty(getattr(piece, a).shape, dtype=getattr(piece, a).dtype,
                                device=local.device).copy_(getattr(piece, a)) for a in _INNER}
        chunk = nf4.NF4Tensor(*nf4.construct_nf4_args(piece, {**inner, "requires_grad": False,
                                                               "storage_offset": 0}))
    if tuple(chunk.shape) != tuple(local.shape):  # pragma: no cover - FSDP2 chunks evenly
        raise QuantizeError(f"{label}: chunk {list(chunk.shape)} is not the shard {list(local.shape)}")
    if all(not getattr(local, a).is_meta for a in _INNER):
        # A shard that holds values already: overwrite them in place. FSDP2 builds the
        # unsharded NF4 tensor once, at the first all-gather, keeping the shard's
        # `scaler_mean` tensor (later all-gathers refill only the gathered three), so a
        # weight stored again after a forward must land in the same tensors.
        for a in _INNER:
            getattr(local, a).copy_(getattr(chunk, a))
    elif isinstance(param, DTensor):
        param._local_tensor = chunk  # FSDP2 all-gathers from the DTensor's local tensor
    else:
        module._parameters[attr] = nn.Parameter(chunk, requires_grad=False)
