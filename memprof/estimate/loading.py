"""A :class:`~memprof.estimate.catalog.ModelSpec` from the CLI's MODEL argument: a built-in
name, a transformers ``config.json``, or user code named ``module:factory``."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from memprof.errors import EstimateError
from memprof.estimate.catalog import KNOWN_MODELS, ModelSpec, synthetic_batch
from memprof.estimate.failures import one_line


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency here
        raise EstimateError(f"building a transformers model needs transformers: {exc}") from exc
    return transformers


def spec_from_config(name: str, config_dict: Mapping[str, Any]) -> ModelSpec:
    """A :class:`ModelSpec` for a transformers config given as a dict (``model_type`` needed).

    The class built is ``architecture`` (or the first of ``architectures``), else the causal-LM
    auto class for the model type, else the base model.
    """
    transformers = _transformers()
    values = dict(config_dict)
    architecture = values.pop("architecture", None)
    archs = values.get("architectures") or []
    architecture = architecture or (archs[0] if archs else None)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise EstimateError(f"{name}: the config has no model_type, so transformers cannot "
                            "tell which model it describes")
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except Exception as exc:  # any failure is the config's
        raise EstimateError(f"{name}: transformers cannot build a config of model_type "
                            f"{model_type!r}: {one_line(exc)}") from exc
    model_cls = getattr(transformers, architecture, None) if architecture else None
    if architecture and model_cls is None:
        raise EstimateError(f"{name}: transformers has no model class {architecture!r}")
    if model_cls is None:
        for auto in ("AutoModelForCausalLM", "AutoModel"):
            mapping = getattr(transformers, auto)._model_mapping
            if type(config) in mapping:
                model_cls = mapping[type(config)]
                break
    if model_cls is None:
        raise EstimateError(f"{name}: transformers has no model for config {type(config).__name__}")

    cls_name = model_cls.__name__
    kind = _batch_kind(cls_name, config)
    has_cache = kind == "causal-lm" and bool(getattr(config, "use_cache", False))
    max_len = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)

    def factory() -> nn.Module:
        cfg = config
        # sdpa is transformers' default where supported; pick it explicitly so the estimate
        # does not depend on what this machine has installed (flash-attn and friends).
        with contextlib.suppress(Exception):
            cfg._attn_implementation = "sdpa"
        try:
            model: nn.Module = model_cls(cfg)
        except Exception as exc:
            raise EstimateError(f"{name}: transformers cannot build {cls_name} from this "
                                f"config: {one_line(exc)}") from exc
        return model

    def make_batch(batch_size: int, seq_len: int) -> Any:
        if max_len is not None and kind != "image-classification" and seq_len > max_len:
            raise EstimateError(f"{name}: --seq-len {seq_len} is longer than the model's "
                                f"{max_len} positions")
        return _batch_for_config(kind, config, batch_size, seq_len)

    n_layers = next((getattr(config, a) for a in ("num_hidden_layers", "n_layer")
                     if hasattr(config, a)), "?")
    width = next((getattr(config, a) for a in ("hidden_size", "n_embd")
                  if hasattr(config, a)), "?")
    return ModelSpec(
        name=name, factory=factory, make_batch=make_batch, kind=kind,
        description=f"{cls_name} ({n_layers} layers, width {width})",
        has_kv_cache=has_cache, config=dict(config_dict),
    )


def _batch_kind(cls_name: str, config: Any) -> str:
    if cls_name.endswith("ForImageClassification") or (
        hasattr(config, "image_size") and not hasattr(config, "vocab_size")
    ):
        return "image-classification"
    if cls_name.endswith("ForCausalLM") or cls_name.endswith("LMHeadModel"):
        return "causal-lm"
    if cls_name.endswith("ForMaskedLM"):
        return "masked-lm"
    return "base"


def _batch_for_config(kind: str, config: Any, batch_size: int, seq_len: int) -> Any:
    image_size = getattr(config, "image_size", 224)
    image_size = image_size if isinstance(image_size, int) else int(image_size[0])
    return synthetic_batch(
        kind, batch_size=batch_size, seq_len=seq_len,
        vocab=int(getattr(config, "vocab_size", 2) or 2), image_size=image_size,
        num_channels=int(getattr(config, "num_channels", 3)),
        num_labels=int(getattr(config, "num_labels", 2)),
    )


@dataclass(frozen=True)
class _FromModelConfig:
    """A batch to synthesise from the built model's transformers config."""

    batch_size: int
    seq_len: int
    target: str


def resolve_batch(data: Any, model: nn.Module) -> Any:
    """The batch itself: ``data``, or the one the built model's config describes."""
    if not isinstance(data, _FromModelConfig):
        return data
    config = getattr(model, "config", None)
    if config is None:
        raise EstimateError(f"{data.target!r}: add make_batch(batch_size, seq_len) to its module "
                            "to say what a batch for this model looks like")
    kind = _batch_kind(type(model).__name__, config)
    return _batch_for_config(kind, config, data.batch_size, data.seq_len)


def build_spec(model: str) -> ModelSpec:
    """Turn the CLI's MODEL argument into a :class:`ModelSpec`.

    ``model`` is a name from :data:`KNOWN_MODELS`, a path to a transformers ``config.json`` (or
    a folder holding one), or ``module:factory`` / ``path/to/file.py:factory`` naming a callable
    that returns an ``nn.Module``. With ``module:factory`` the batch comes from a
    ``make_batch(batch_size, seq_len)`` function in the same module, or, for a transformers
    model, from its config. Raises :class:`EstimateError` with a one-line reason.
    """
    key = model.strip().lower()
    if key in KNOWN_MODELS:
        return spec_from_config(key, KNOWN_MODELS[key])
    path = Path(model)
    if path.suffix == ".json" or path.is_dir():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise EstimateError(f"no config file at {file}")
        try:
            values = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise EstimateError(f"cannot read {file} as JSON: {one_line(exc)}") from exc
        if not isinstance(values, dict):
            raise EstimateError(f"{file} is not a transformers config (not a JSON object)")
        return spec_from_config(str(file), values)
    if ":" in model and not path.exists():
        return _spec_from_factory(model)
    close = difflib.get_close_matches(key, list(KNOWN_MODELS), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(n) for n in close)}? " if close else ""
    raise EstimateError(
        f"unknown model {model!r}: {hint}use a known name ({', '.join(KNOWN_MODELS)}), "
        "a path to a transformers config.json, or module:factory"
    )


def _spec_from_factory(target: str) -> ModelSpec:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise EstimateError(f"{target!r}: write module:factory, such as mypkg.models:build")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise EstimateError(f"{target!r}: no file {file}")
            spec = importlib.util.spec_from_file_location(file.stem, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(file.stem, module)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # `memprof estimate mymodels:build` from the project
            module = importlib.import_module(module_name)
    except EstimateError:
        raise
    except Exception as exc:  # the user's module failed to import
        raise EstimateError(f"{target!r}: cannot import {module_name}: {one_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EstimateError(f"{target!r}: {module_name} has no callable {attr!r}")
    make_batch = getattr(module, "make_batch", None)

    def batch(batch_size: int, seq_len: int) -> Any:
        if callable(make_batch):
            return make_batch(batch_size, seq_len)
        return _FromModelConfig(batch_size, seq_len, target)  # a transformers model's config

    return ModelSpec(name=target, factory=factory, make_batch=batch, kind="custom",
                     description=f"{module_name}.{attr}()",
                     has_kv_cache=bool(getattr(module, "HAS_KV_CACHE", False)))
