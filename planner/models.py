"""Resolve a `--model` spec and build the model on the meta device.

A spec names a model in one of four ways:

- a preset name from `plans/models/` (`llama-3.1-8b`, `tiny-llama`, …): published
  `config.json` values shipped with meshplan (`list_presets()` lists them);
- a local Hugging Face directory holding `config.json` (weights are optional and are
  never read here), or the path of such a `config.json` file;
- `package.module:factory`: meshplan imports that module and calls the factory with no
  arguments, which **runs that code**; the factory must return an `nn.Module`. It is
  called under `torch.device("meta")`, so modules it creates allocate no memory unless
  the factory asks for a device explicitly;
- (Python API only) an `nn.Module` object.

An existing directory wins over a preset of the same name; preset names are
case-insensitive.

Guarantees:

- `resolve_model` either returns a `ModelSource` or raises `ModelSpecError` (a
  `ValueError`) with a one-line message naming the spec and what is wrong with it:
  an unknown preset (with the nearest preset names), a directory without `config.json`,
  invalid JSON, a `model_type` or architecture this transformers does not know, a
  config transformers rejects, a factory that cannot be imported, raises, or does not
  return an `nn.Module`. A user mistake never surfaces as a traceback.
- `build_meta_model` builds every parameter on the meta device: compiling a plan for a
  405B model allocates no weights. It never mutates the source's config, and can build
  a copy with fewer decoder layers (`num_layers=k`, or chosen `layers=`), carrying the
  per-layer config lists (`layer_types`, …) of the layers it keeps, so a kept layer
  behaves like the full model's layer of the same index.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.resources
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "PER_LAYER_CONFIG_LISTS",
    "ModelSource",
    "ModelSpecError",
    "build_meta_model",
    "list_presets",
    "load_preset",
    "resolve_model",
]

_PRESET_PACKAGE = "meshplan.plans.models"

# Config attributes that hold one entry per decoder layer. When a copy with fewer layers
# is built, these are cut down to the kept layers so each kept layer keeps its kind
# (Gemma-2's sliding/global alternation lives in `layer_types`).
PER_LAYER_CONFIG_LISTS: tuple[str, ...] = ("layer_types", "no_rope_layers")

# Weight files a Hugging Face directory may hold; only listed, never opened here.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json")

SourceKind = Literal["preset", "directory", "factory", "module"]


class ModelSpecError(ValueError):
    """A `--model` spec that cannot be resolved; the message is one line, for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class ModelConfigError(ModelSpecError):
    """The spec names a model, but its config cannot describe one (a size of 0, say)."""


# Config sizes that must be positive integers when present: a vocabulary, width or head
# count of 0 builds a model with empty tensors that every later check would pass.
POSITIVE_SIZES: tuple[str, ...] = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size",
    "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
    "n_embd", "n_head", "n_layer", "n_positions", "n_inner",
)
# `org/name`, as on the Hugging Face Hub.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, eq=False)
class ModelSource:
    """A resolved model: where it comes from, its config, and how to build it.

    `config` and `model_class` are set for transformers models (presets, directories,
    and factories or objects that are `PreTrainedModel`s); `module` is set for factories
    and objects. `values` are the raw config values (a preset's or config.json's, without
    the `_source`/`_description` keys); `origin` says where they come from (a URL for a
    published preset, "meshplan test model", a path, or the factory spec).
    """

    spec: str
    kind: SourceKind
    name: str
    description: str = ""
    origin: str = ""
    config: Any = None  # transformers.PretrainedConfig; Any keeps transformers' import lazy
    model_class: type[nn.Module] | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None
    weights: tuple[Path, ...] = ()
    module: nn.Module | None = None

    @property
    def architecture(self) -> str | None:
        """The model class name, e.g. `LlamaForCausalLM`."""
        if self.model_class is not None:
            return self.model_class.__name__
        return type(self.module).__name__ if self.module is not None else None

    @property
    def num_layers(self) -> int | None:
        """`config.num_hidden_layers`, when the model has a transformers config."""
        n = getattr(self.config, "num_hidden_layers", None)
        return n if isinstance(n, int) else None

    @property
    def can_reduce(self) -> bool:
        """Whether `build_meta_model` can build a copy with fewer layers."""
        return (
            self.config is not None and self.model_class is not None and self.num_layers is not None
        )

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the config declares (informational: meta models are built in fp32)."""
        d = getattr(self.config, "dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        return d if isinstance(d, torch.dtype) else None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _describe(exc: BaseException) -> str:
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- presets


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    root = importlib.resources.files(_PRESET_PACKAGE)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw JSON of preset `name` (including `_source` and `_description`)."""
    presets = list_presets()
    key = name.strip().lower()
    if key not in presets:
        raise ModelSpecError(_unknown_preset_message(name, presets))
    text = importlib.resources.files(_PRESET_PACKAGE).joinpath(f"{key}.json").read_text("utf-8")
    return _parse_json(text, f"preset '{key}'")


def _unknown_preset_message(spec: str, presets: list[str]) -> str:
    key = spec.strip().lower()
    near = difflib.get_close_matches(key, presets, n=3, cutoff=0.5)
    near += [p for p in presets if key and (p.startswith(key) or key in p) and p not in near]
    head = (
        f"unknown model '{spec}': not a preset, a directory with config.json, or a module:factory"
    )
    if near:
        return f"{head}; did you mean {', '.join(near[:4])}?"
    return f"{head}; presets are {', '.join(presets)}"


def _hub_id_message(spec: str) -> str:
    """For `org/name` that is no local directory: nothing is downloaded; what to pass."""
    match = None
    for name in list_presets():
        source = str(load_preset(name).get("_source", ""))
        if f"huggingface.co/{spec.lower()}/" in source.lower():
            match = name
            break
    head = (f"'{spec}' looks like a Hugging Face Hub id and is not a local directory; meshplan "
            "downloads nothing")
    if match:
        return f"{head}: the preset '{match}' holds this model's published config (--model {match})"
    return (f"{head}: pass a preset name (`plan models` lists them), a local directory holding the "
            "model's config.json (weights are optional), or package.module:factory")


def _parse_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSpecError(
            f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{where} must hold a JSON object, not {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- resolving

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def resolve_model(spec: str | nn.Module | ModelSource) -> ModelSource:
    """Resolve a model spec (see the module docstring); raises `ModelSpecError`."""
    if isinstance(spec, ModelSource):
        return spec
    if isinstance(spec, nn.Module):
        return _from_module(
            spec, spec=type(spec).__name__, kind="module", origin="nn.Module object"
        )
    if not isinstance(spec, str):
        raise ModelSpecError(
            f"a model spec must be a string or an nn.Module, not {type(spec).__name__}"
        )
    text = spec.strip()
    if not text:
        raise ModelSpecError("empty model spec: give a preset name, a directory, or module:factory")
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_directory(text, path)
    if path.is_file():
        if path.suffix == ".json":
            return _from_directory(text, path.parent, config_file=path)
        raise ModelSpecError(f"model '{text}' is a file; give the directory that holds config.json")
    if _FACTORY_RE.match(text):
        return _from_factory(text)
    if _HUB_ID_RE.match(text) and not text.startswith((".", "~")):
        raise ModelSpecError(_hub_id_message(text))
    if "/" in text or "\\" in text or text.startswith((".", "~")):
        raise ModelSpecError(f"model directory '{text}' does not exist")
    if ":" in text:
        raise ModelSpecError(f"model factory '{text}' must look like package.module:function")
    presets = list_presets()
    if text.lower() not in presets:
        raise ModelSpecError(_unknown_preset_message(text, presets))
    values = load_preset(text)
    return _from_values(
        values,
        spec=text,
        kind="preset",
        name=text.lower(),
        where=f"preset '{text.lower()}'",
        origin=str(values.get("_source", "")),
        description=str(values.get("_description", "")),
    )


def _from_directory(spec: str, directory: Path, config_file: Path | None = None) -> ModelSource:
    config_path = config_file or directory / "config.json"
    if not config_path.is_file():
        raise ModelSpecError(
            f"directory '{spec}' has no config.json (a model directory needs the "
            "Hugging Face config.json; weights are optional)"
        )
    try:
        text = config_path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"cannot read {config_path}: {_describe(exc)}") from None
    values = _parse_json(text, str(config_path))
    weights = tuple(sorted({p for pattern in _WEIGHT_PATTERNS for p in directory.glob(pattern)}))
    return _from_values(
        values,
        spec=spec,
        kind="directory",
        name=directory.resolve().name,
        where=str(config_path),
        origin=str(directory.resolve()),
        description=str(values.get("_description", "")),
        path=directory,
        weights=weights,
    )


def _from_values(
    raw: Mapping[str, Any],
    *,
    spec: str,
    kind: SourceKind,
    name: str,
    where: str,
    origin: str,
    description: str,
    path: Path | None = None,
    weights: tuple[Path, ...] = (),
) -> ModelSource:
    import transformers

    values = {k: v for k, v in raw.items() if not k.startswith("_")}
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelSpecError(f"{where} has no model_type")
    _check_sizes(values, where)
    kwargs = {k: v for k, v in values.items() if k != "model_type"}
    # `torch_dtype` is the published key; transformers 5 calls it `dtype`.
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs["torch_dtype"])
        del kwargs["torch_dtype"]
    try:
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except ValueError as exc:
        if "Unrecognized model identifier" in str(exc):
            raise ModelSpecError(
                f"{where}: unknown model_type '{model_type}' "
                f"(transformers {transformers.__version__} does not know it)"
            ) from None
        raise ModelSpecError(
            f"{where}: transformers rejects the config: {_describe(exc)}"
        ) from None
    except Exception as exc:
        raise ModelSpecError(
            f"{where}: transformers rejects the config: {_describe(exc)}"
        ) from None
    model_class = _architecture_class(values.get("architectures"), config, where)
    return ModelSource(
        spec=spec,
        kind=kind,
        name=name,
        description=description,
        origin=origin,
        config=config,
        model_class=model_class,
        values=values,
        path=path,
        weights=weights,
    )


def _check_sizes(values: Mapping[str, Any], where: str) -> None:
    for key in POSITIVE_SIZES:
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(f"{where}: `{key}` is {json.dumps(value)}; it must be a positive integer")


def _architecture_class(architectures: Any, config: Any, where: str) -> type[nn.Module]:
    import transformers

    if architectures is None:
        # No `architectures`: fall back to the causal-LM class registered for the config.
        mapping: Any = transformers.AutoModelForCausalLM._model_mapping
        try:
            found: Any = mapping[type(config)]
        except (KeyError, AttributeError):
            raise ModelSpecError(
                f"{where} has no 'architectures' and model_type '{config.model_type}' "
                "has no causal-LM class in transformers"
            ) from None
        cls_found: type[nn.Module] = found
        return cls_found
    if (
        not isinstance(architectures, list)
        or not architectures
        or not all(isinstance(a, str) for a in architectures)
    ):
        raise ModelSpecError(f"{where}: 'architectures' must be a non-empty list of class names")
    name = architectures[0]
    cls: Any
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelSpecError(
            f"{where}: unknown architecture '{name}' (transformers {transformers.__version__} "
            "has no such model class; remote code is not run: use a module:factory)"
        )
    return cls


def _from_factory(spec: str) -> ModelSource:
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # the module's own code may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ModelSpecError(
            f"model factory '{spec}': cannot import '{module_name}': {_describe(exc)}"
        ) from None
    factory: Any = module
    for part in attr_path.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ModelSpecError(
                f"model factory '{spec}': '{module_name}' has no attribute '{attr_path}'"
            ) from None
    if not callable(factory):
        raise ModelSpecError(f"model factory '{spec}' is not callable")
    try:
        # Under the meta device, modules the factory creates allocate no memory.
        with torch.device("meta"):
            built = factory()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ModelSpecError(f"model factory '{spec}' raised {_describe(exc)}") from None
    if not isinstance(built, nn.Module):
        raise ModelSpecError(
            f"model factory '{spec}' returned {type(built).__name__}, not an nn.Module"
        )
    return _from_module(built, spec=spec, kind="factory", origin=spec)


def _from_module(module: nn.Module, *, spec: str, kind: SourceKind, origin: str) -> ModelSource:
    config: Any = getattr(module, "config", None)
    is_transformers = _is_transformers_config(config)
    values: dict[str, Any] = config.to_dict() if is_transformers else {}
    return ModelSource(
        spec=spec,
        kind=kind,
        name=spec,
        description=(inspect.getdoc(type(module)) or "").split("\n", 1)[0],
        origin=origin,
        config=config if is_transformers else None,
        model_class=type(module) if is_transformers else None,
        values=values,
        module=module,
    )


def _is_transformers_config(config: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(config, PretrainedConfig)


# --------------------------------------------------------------------------- building


def reduced_config(config: Any, layers: Sequence[int]) -> Any:
    """A copy of `config` with just `layers` (indices into the full model's layers).

    Per-layer lists (`PER_LAYER_CONFIG_LISTS`) keep the entries of the kept layers, so
    kept layer j behaves like the full model's layer `layers[j]`.
    """
    n = config.num_hidden_layers
    if not layers:
        raise ValueError("a reduced model needs at least one layer")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range for {n} layers")
    out = copy.deepcopy(config)
    for attr in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(out, attr, type(value)(value[i] for i in layers))
    # Where the kind of a layer follows from its index (DeepSeek-V3's first dense layers,
    # Qwen-MoE's dense `mlp_only_layers`), the index is the kept layer's position now.
    first_dense = getattr(config, "first_k_dense_replace", None)
    if isinstance(first_dense, int) and list(layers) == sorted(layers):
        out.first_k_dense_replace = sum(1 for i in layers if i < first_dense)
    dense_only = getattr(config, "mlp_only_layers", None)
    if isinstance(dense_only, (list, tuple)):
        out.mlp_only_layers = [j for j, i in enumerate(layers) if i in dense_only]
    out.num_hidden_layers = len(layers)
    return out


def build_meta_model(
    source: ModelSource | str | nn.Module,
    *,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model on the meta device (no weights are allocated).

    `num_layers=k` keeps the first k decoder layers; `layers=[i, j, …]` keeps the given
    layers of the full model (see `reduced_config`). `attn_implementation` defaults to
    transformers' choice (sdpa where the class supports it, else eager). The model is
    built with `use_cache=False`, in fp32 unless `dtype` is given.

    For a factory or an `nn.Module` that is not a transformers model, the module itself
    is returned (not a copy) and fewer layers cannot be asked for.
    """
    src = resolve_model(source)
    if num_layers is not None and layers is not None:
        raise ValueError("give num_layers or layers, not both")
    want_reduced = num_layers is not None or layers is not None
    if src.module is not None and not want_reduced:
        # The object itself: it may carry changes its config does not describe.
        return src.module
    if not src.can_reduce:
        if want_reduced:
            raise ModelSpecError(
                f"model '{src.spec}' has no transformers config, so a copy with fewer "
                "layers cannot be built"
            )
        raise ModelSpecError(f"model '{src.spec}' cannot be built")
    config = src.config
    if layers is None and num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(
                f"num_layers must be in 1..{config.num_hidden_layers}, not {num_layers}"
            )
        layers = range(num_layers)
    config = reduced_config(config, list(layers)) if layers is not None else copy.deepcopy(config)
    config.use_cache = False
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if experts_implementation is not None and hasattr(config, "_experts_implementation"):
        config._experts_implementation = experts_implementation
    assert src.model_class is not None
    try:
        with torch.device("meta"):
            model = src.model_class(config)
    except Exception as exc:
        raise ModelSpecError(
            f"model '{src.spec}': building {src.model_class.__name__} failed: {_describe(exc)}"
        ) from None
    if dtype is not None:
        model.to(dtype)
    return model
