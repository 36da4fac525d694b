"""Estimate a training (or inference) step's memory without the hardware.

The model is built and run under :class:`torch._subclasses.fake_tensor.FakeTensorMode` on fake
CPU tensors: nothing is allocated, every shape, dtype and storage size is exact, and memprof's
ordinary :class:`~memprof.tracking.session.Profiler` records the step as if it ran. The result is
an ordinary :class:`~memprof.profile.Profile`, so the advisor and the HTML report read it
unchanged.

What is *modelled* rather than measured is listed in ``profile.device.modelled`` and
``profile.meta["estimate"]``:

* CUDA's caching allocator hands out 512-byte blocks: with ``device="cuda"`` every storage is
  charged rounded up to 512 bytes (fake CUDA tensors fail in backward on a machine with no GPU,
  so the step runs on fake CPU tensors and the rounding is applied in the accounting);
* the CUDA context (driver, kernels, cuBLAS workspace) is not a tensor: it is added as a
  documented figure, :data:`CUDA_CONTEXT_BYTES`, to ``meta["estimate"]["device_total_bytes"]``
  and to the fit verdict, never to the tensor categories;
* on CUDA, torch's optimizers default to their ``foreach`` implementations, whose scratch is
  one tensor per parameter at once: the optimizer is built with ``foreach=True`` for
  ``device="cuda"`` and with the CPU default for ``device="cpu"``;
* reserved memory: the step's allocations replay through a model of the CUDA caching allocator
  (:mod:`memprof.allocator`); ``meta["estimate"]`` gives ``reserved_bytes`` and
  ``fragmentation_bytes`` and the fit verdict counts what the allocator caches beyond the
  tensors.

Example::

    from transformers import GPT2Config, GPT2LMHeadModel
    import memprof.estimate as est

    profile = est.estimate(
        lambda: GPT2LMHeadModel(GPT2Config()),
        batch=lambda: est.synthetic_batch("causal-lm", batch_size=8, seq_len=1024, vocab=50257),
    )
    print(profile.peak().describe(), profile.meta["estimate"]["device_total_bytes"])

The built-in catalog of shapes (:data:`KNOWN_MODELS`) and :func:`build_spec` turn a name, a local
``config.json`` or ``module:factory`` into a :class:`ModelSpec` that the CLI estimates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memprof.devices import CUDA_BLOCK_BYTES
from memprof.errors import EstimateError, MemprofError
from memprof.fake_scalars import ScalarStandIns
from memprof.gpus import CUDA_CONTEXT_BYTES as GPU_CONTEXT_BYTES
from memprof.gpus import FRAGMENTATION_FRACTION, budget_of, replay_cached_bytes
from memprof.profile import Profile
from memprof.units import format_bytes

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "DTYPES",
    "KNOWN_MODELS",
    "OPTIMIZERS",
    "EstimateError",
    "EstimatedStep",
    "ModelSpec",
    "build_spec",
    "estimate",
    "estimate_step",
    "synthetic_batch",
]

#: The CUDA context a process holds before its first tensor (driver state, kernels,
#: cuBLAS/cuDNN handles): memprof.gpus' figure, shared with the advisor's budgets. Modelled, not
#: measured: see ``meta["estimate"]``.
CUDA_CONTEXT_BYTES = GPU_CONTEXT_BYTES

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
OPTIMIZERS = ("adamw", "sgd", "adafactor", "none")
DEVICES = ("cuda", "cpu")

#: Batch kinds :func:`synthetic_batch` can make.
BATCH_KINDS = ("causal-lm", "masked-lm", "image-classification", "base")


# --------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class ModelSpec:
    """A model to estimate: how to build it and what a batch for it looks like.

    ``factory`` builds the ``nn.Module`` (called inside the fake mode, under the target default
    dtype); ``make_batch(batch_size, seq_len)`` builds the inputs, also inside the fake mode, as
    a dict of keyword arguments (or a tensor / tuple of positional ones). ``kind`` is one of
    :data:`BATCH_KINDS` or ``"custom"``; ``has_kv_cache`` says inference can keep a KV cache.
    """

    name: str
    factory: Callable[[], nn.Module]
    make_batch: Callable[[int, int], Any]
    kind: str = "custom"
    description: str = ""
    has_kv_cache: bool = False
    config: Mapping[str, Any] | None = None


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    return {"model_type": "gpt2", "architecture": "GPT2LMHeadModel", "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "vocab_size": 50257, "n_positions": 1024}


def _llama_like(model_type: str, architecture: str, *, intermediate: int, kv_heads: int,
                vocab: int, max_pos: int, **extra: Any) -> dict[str, Any]:
    return {"model_type": model_type, "architecture": architecture, "hidden_size": 4096,
            "intermediate_size": intermediate, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, **extra}


#: Built-in shapes (transformers configs written out here: nothing is downloaded). Each value is
#: a config dict with ``model_type`` and the ``architecture`` (transformers class) to build.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "llama-2-7b": _llama_like("llama", "LlamaForCausalLM", intermediate=11008, kv_heads=32,
                              vocab=32000, max_pos=4096),
    "llama-3-8b": _llama_like("llama", "LlamaForCausalLM", intermediate=14336, kv_heads=8,
                              vocab=128256, max_pos=8192, rope_theta=500000.0),
    "mistral-7b": _llama_like("mistral", "MistralForCausalLM", intermediate=14336, kv_heads=8,
                              vocab=32000, max_pos=32768, sliding_window=4096,
                              rope_theta=10000.0),
    "bert-base": {"model_type": "bert", "architecture": "BertForMaskedLM", "hidden_size": 768,
                  "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 30522,
                  "max_position_embeddings": 512},
    "vit-base": {"model_type": "vit", "architecture": "ViTForImageClassification",
                 "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
                 "num_channels": 3, "num_labels": 1000},
}


def synthetic_batch(
    kind: str, *, batch_size: int, seq_len: int = 512, vocab: int = 32000,
    image_size: int = 224, num_channels: int = 3, num_labels: int = 1000,
) -> dict[str, torch.Tensor]:
    """A batch of the right shapes and dtypes (contents do not matter to memory).

    ``causal-lm`` / ``masked-lm``: ``input_ids`` and ``labels`` (int64, ``batch_size x seq_len``);
    ``base``: ``input_ids`` only; ``image-classification``: ``pixel_values`` (float32,
    ``batch_size x C x H x W``) and ``labels`` (int64, ``batch_size``). Call it inside the fake
    mode (as :func:`estimate` does for a callable batch) to make fake tensors.
    """
    if kind in ("causal-lm", "masked-lm", "base"):
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        if kind == "base":
            return {"input_ids": ids}
        return {"input_ids": ids, "labels": torch.zeros(batch_size, seq_len, dtype=torch.long)}
    if kind == "image-classification":
        return {
            "pixel_values": torch.zeros(batch_size, num_channels, image_size, image_size),
            "labels": torch.zeros(batch_size, dtype=torch.long),
        }
    raise EstimateError(f"unknown batch kind {kind!r}; known: {', '.join(BATCH_KINDS)}")


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
                            f"{model_type!r}: {_one_line(exc)}") from exc
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
                                f"config: {_one_line(exc)}") from exc
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


def _resolve_batch(data: Any, model: nn.Module) -> Any:
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
            raise EstimateError(f"cannot read {file} as JSON: {_one_line(exc)}") from exc
        if not isinstance(values, dict):
            raise EstimateError(f"{file} is not a transformers config (not a JSON object)")
        return spec_from_config(str(file), values)
    if ":" in model and not path.exists():
        return _spec_from_factory(model)
    raise EstimateError(
        f"unknown model {model!r}: use a known name ({', '.join(KNOWN_MODELS)}), "
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
        raise EstimateError(f"{target!r}: cannot import {module_name}: {_one_line(exc)}") from exc
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


# --------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class EstimatedStep:
    """An estimate's profile and the fake objects that made it, kept so that the advisor can
    run changes on fake copies of the same model (:func:`estimate_step`).

    ``model`` and ``optimizer`` hold fake tensors only (nothing allocated); ``batch`` is the
    fake batch; ``loss(model, batch)`` is the step's forward and loss (under the estimate's
    autocast), to which a training step adds backward, the optimizer step and ``zero_grad``.
    ``optimizer`` is None for inference and for ``optimizer="none"``.
    """

    profile: Profile
    model: nn.Module = dataclasses.field(repr=False)
    optimizer: torch.optim.Optimizer | None = dataclasses.field(repr=False)
    batch: Any = dataclasses.field(repr=False)
    loss: Callable[[nn.Module, Any], torch.Tensor] = dataclasses.field(repr=False)
    inference: bool = False


def estimate(
    model_factory: Callable[[], nn.Module] | ModelSpec,
    *,
    batch: Any,
    optimizer: str = "adamw",
    dtype: str = "bf16",
    mixed_precision: str | None = None,
    device: str = "cuda",
    gpu: str | None = None,
    steps: int = 2,
    inference: bool = False,
    context_len: int | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> Profile:
    """:func:`estimate_step`'s profile (see there for the arguments)."""
    return estimate_step(
        model_factory, batch=batch, optimizer=optimizer, dtype=dtype,
        mixed_precision=mixed_precision, device=device, gpu=gpu, steps=steps,
        inference=inference, context_len=context_len, loss_fn=loss_fn,
    ).profile


def estimate_step(
    model_factory: Callable[[], nn.Module] | ModelSpec,
    *,
    batch: Any,
    optimizer: str = "adamw",
    dtype: str = "bf16",
    mixed_precision: str | None = None,
    device: str = "cuda",
    gpu: str | None = None,
    steps: int = 2,
    inference: bool = False,
    context_len: int | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> EstimatedStep:
    """Profile ``steps`` steps of a model that is never allocated: the Profile, and the fake
    model, optimizer and batch that made it.

    ``model_factory`` builds the model (inside FakeTensorMode, with ``dtype`` as the default
    dtype; floating parameters it made in another dtype are cast). ``batch`` is a dict of
    tensors (keyword arguments), a tensor or tuple (positional), or a callable returning one,
    called inside the fake mode; real tensors are converted to fake ones.

    Training (default): forward, ``loss.backward()``, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)`` per step; ``steps=2`` so that the second step's peak
    includes the optimizer state. The loss is ``output.loss`` when the model returns one (a
    transformers model given ``labels``), else ``loss_fn(output)``, else the mean of the first
    output tensor. ``optimizer``: ``adamw`` | ``sgd`` (momentum 0.9) | ``adafactor`` | ``none``
    (gradients only). ``mixed_precision="bf16"``/``"fp16"`` keeps fp32 weights and optimizer
    state and runs forward under autocast (``dtype`` must then be ``"fp32"`` or the same name).

    Inference (``inference=True``): ``model.eval()`` and ``torch.no_grad()``; for a model with
    a KV cache, a prefill over the batch and one decoding step, with a cache of ``context_len``
    positions (a static cache allocated up front) or, without it, as long as the prompt.

    ``device="cuda"`` charges storages in 512-byte blocks and adds :data:`CUDA_CONTEXT_BYTES`
    to ``meta["estimate"]["device_total_bytes"]``; ``device="cpu"`` charges exact bytes, so the
    estimate equals a real CPU run. ``gpu`` (a name from :mod:`memprof.gpus`) adds a fit verdict
    to ``meta["estimate"]["fit"]``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.tracking.session import Profiler

    spec = model_factory if isinstance(model_factory, ModelSpec) else None
    factory: Callable[[], nn.Module] = (
        model_factory.factory if isinstance(model_factory, ModelSpec) else model_factory
    )
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("dtype", dtype, tuple(DTYPES))
    _check_choice("device", device, DEVICES)
    if mixed_precision is not None:
        _check_choice("mixed_precision", mixed_precision, ("bf16", "fp16"))
        if dtype not in ("fp32", mixed_precision):
            raise EstimateError(f"mixed precision keeps fp32 weights: use dtype='fp32' "
                                f"(got dtype={dtype!r}, mixed_precision={mixed_precision!r})")
    if steps < 1:
        raise EstimateError(f"steps must be at least 1 (got {steps})")
    budget = _gpu_budget(gpu) if gpu is not None else None  # a bad name fails before the work
    param_dtype = torch.float32 if mixed_precision else DTYPES[dtype]
    round_to = CUDA_BLOCK_BYTES if device == "cuda" else 1
    kv_cache_bytes: int | None = None

    with FakeTensorMode(allow_non_fake_inputs=False) as fake_mode:
        model = _build_model(factory, param_dtype)
        opt = None if inference else _make_optimizer(optimizer, model, cuda=device == "cuda")
        with _default_dtype(param_dtype), _user_code("the batch function"):
            data = batch() if callable(batch) else batch
        data = _to_fake(fake_mode, _resolve_batch(data, model))
        autocast: Any = (
            torch.autocast("cpu", dtype=DTYPES[mixed_precision])
            if mixed_precision else contextlib.nullcontext()
        )
        with (_user_code("the step under fake tensors"),
              Profiler(model, opt, round_to=round_to, device_modelled=device) as prof):
            for _ in range(steps):
                if inference:
                    kv_cache_bytes = _inference_step(model, data, spec, context_len, autocast)
                else:
                    _training_step(model, opt, data, autocast, loss_fn)
                prof.step()
        profile = prof.profile
        num_params, param_bytes = _count_parameters(model)

    profile = _annotate(
        profile, spec=spec, optimizer="none" if inference else optimizer, dtype=dtype,
        mixed_precision=mixed_precision, device=device, gpu=gpu, steps=steps,
        inference=inference, context_len=context_len, kv_cache_bytes=kv_cache_bytes,
        num_params=num_params, param_bytes=param_bytes, budget=budget,
    )
    autocast_dtype = DTYPES[mixed_precision] if mixed_precision else None

    def step_loss(model: nn.Module, data: Any) -> torch.Tensor:
        with (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
              else contextlib.nullcontext()):
            output = _call(model, data)
        return _loss(output, loss_fn)

    return EstimatedStep(profile=profile, model=model, optimizer=opt, batch=data,
                         loss=step_loss, inference=inference)


@contextlib.contextmanager
def _user_code(what: str) -> Iterator[None]:
    """Turn a failure of the user's code (model, batch) into one EstimateError line."""
    try:
        yield
    except MemprofError:
        raise
    except Exception as exc:
        raise EstimateError(f"{what} failed: {_one_line(exc)}{_refusal_hint(exc)}") from exc


def _refusal_hint(exc: BaseException) -> str:
    """Why a fake run failed, and what to do instead, for the failures known to be no bug of
    the model: an estimate that cannot run says so in one line."""
    text = str(exc)
    if "DataDependent" in type(exc).__name__:
        return (" (the model branches on tensor values, such as a CTC loss checking "
                "labels.max(), which fake tensors do not have; such code cannot be estimated "
                "without running it: profile one real step with memprof.profile or memprof run)")
    if "convert all Tensors to FakeTensors" in text:
        return (" (the model holds real tensors made outside the estimate, as a model built or "
                "compiled beforehand does: pass a factory that builds it, such as "
                "lambda: Model(config), and compile it inside the factory if at all)")
    if "_grouped_mm" in text or ("Expected inputs of BF16 type" in text and "mat_a" in text):
        return (" (the mixture-of-experts kernel torch._grouped_mm has a fake kernel for bf16 "
                "only, where the real CPU kernel also runs fp32: estimate with dtype='bf16', or "
                "profile one real step with memprof.profile or memprof run)")
    return ""


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EstimateError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_model(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    # Building under the target default dtype (as transformers' from_pretrained(dtype=...)
    # does) never materialises fp32 weights; module.to(dtype) cannot be used under fake mode
    # anyway (it swaps tensors, which fake tensors with weak references refuse).
    try:
        with _default_dtype(dtype), torch.device("cpu"), _skip_weight_init():
            model = factory()
    except MemprofError:
        raise
    except Exception as exc:  # the user's factory failed
        raise EstimateError(f"the model factory failed: {_one_line(exc)}") from exc
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise EstimateError(f"the model factory returned {type(model).__name__}, "
                            "not a torch.nn.Module")
    tie = getattr(model, "tie_weights", None)
    if callable(tie) and "transformers" in sys.modules:
        tie()  # skipping transformers' init_weights also skipped its weight tying
    _cast_parameters(model, dtype)
    return model


def _skip_weight_init() -> contextlib.AbstractContextManager[Any]:
    """Skip transformers' weight initialisation: values do not matter to memory, and some
    initialisers (``trunc_normal_``) branch on values, which fake tensors do not have."""
    module = sys.modules.get("transformers")
    if module is None:
        return contextlib.nullcontext()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    manager: contextlib.AbstractContextManager[Any] = no_init_weights()
    return manager


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters of another dtype, keeping tied parameters tied."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            new = cast.get(id(param))
            if new is None:
                new = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                cast[id(param)] = new
            module._parameters[name] = new


def _make_optimizer(name: str, model: nn.Module, *, cuda: bool) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "none" or not params:
        return None
    # On CUDA torch picks the foreach implementations by default; say so explicitly on the
    # fake CPU tensors so their scratch (one tensor per parameter at once) is in the estimate.
    foreach = True if cuda else None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=foreach)
    if not hasattr(torch.optim, "Adafactor"):  # pragma: no cover - torch < 2.5
        raise EstimateError("optimizer adafactor needs torch >= 2.5")
    return torch.optim.Adafactor(params, lr=1e-2, foreach=foreach)


#: Optimizers whose step reads a value (Adafactor: ``param.norm().item()`` scales the update).
_VALUE_READING_OPTIMIZERS: tuple[type, ...] = tuple(
    cls for cls in (getattr(torch.optim, "Adafactor", None),) if cls is not None
)


def _to_fake(mode: Any, data: Any) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return mode.from_tensor(value)
        return value

    if isinstance(data, Mapping):
        return {k: convert(v) for k, v in data.items()}
    if isinstance(data, tuple | list):
        return type(data)(convert(v) for v in data)
    return convert(data)


def _call(model: nn.Module, data: Any, **extra: Any) -> Any:
    if isinstance(data, Mapping):
        return model(**data, **extra)
    if isinstance(data, tuple | list):
        return model(*data, **extra)
    return model(data, **extra)


def _loss(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if loss_fn is not None:
        return loss_fn(output)
    from torch.utils._pytree import tree_flatten

    first = output if isinstance(output, torch.Tensor) else next(
        (v for v in tree_flatten(output)[0]
         if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if first is None:
        raise EstimateError("the model returned no floating tensor to take a loss of; "
                            "pass loss_fn=")
    return first.mean()


def _training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, data: Any, autocast: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None,
) -> None:
    model.train()
    with autocast:
        output = _call(model, data)
    loss = _loss(output, loss_fn)
    del output
    loss.backward()
    del loss
    if optimizer is not None:
        with ScalarStandIns() if isinstance(optimizer, _VALUE_READING_OPTIMIZERS) else (
            contextlib.nullcontext()
        ):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)


def _inference_step(
    model: nn.Module, data: Any, spec: ModelSpec | None, context_len: int | None, autocast: Any,
) -> int | None:
    """Prefill (and one decoding step with the KV cache where the model has one)."""
    model.eval()
    cached = isinstance(data, Mapping) and "input_ids" in data and _uses_cache(model, spec)
    with torch.no_grad(), autocast:
        if not cached:
            _call(model, data)
            return None
        inputs = {k: v for k, v in data.items() if k != "labels"}
        extra: dict[str, Any] = {"use_cache": True}
        if context_len is not None:
            prompt = int(inputs["input_ids"].shape[1])
            if context_len <= prompt:
                raise EstimateError(f"context_len {context_len} must exceed the prompt's "
                                    f"{prompt} tokens (one more is decoded)")
            from transformers import StaticCache

            config: Any = model.config
            extra["past_key_values"] = StaticCache(config=config, max_cache_len=context_len)
        output = _call(model, inputs, **extra)
        cache = output.past_key_values
        next_ids = output.logits[:, -1:].argmax(-1)
        del output
        _call(model, {"input_ids": next_ids}, past_key_values=cache, use_cache=True)
        return _tensor_bytes(cache)


def _uses_cache(model: nn.Module, spec: ModelSpec | None) -> bool:
    if spec is not None:
        return spec.has_kv_cache
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False)) and hasattr(model, "generate")


def _tensor_bytes(obj: Any) -> int:
    """Distinct storage bytes of the tensors held by a cache object (layers of keys/values)."""
    seen: dict[int, int] = {}
    layers = getattr(obj, "layers", None)
    items: list[Any] = list(layers) if layers is not None else [obj]
    for item in items:
        for attr in ("keys", "values", "key_cache", "value_cache"):
            value = getattr(item, attr, None)
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    seen: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        seen.setdefault(id(param), param)
    return (sum(p.numel() for p in seen.values()),
            sum(p.numel() * p.element_size() for p in seen.values()))


def _annotate(profile: Profile, *, spec: ModelSpec | None, optimizer: str, dtype: str,
              mixed_precision: str | None, device: str, gpu: str | None, steps: int,
              inference: bool, context_len: int | None, kv_cache_bytes: int | None,
              num_params: int, param_bytes: int, budget: tuple[int, str] | None) -> Profile:
    """Record what was estimated and what was modelled; add the fit verdict for ``gpu``."""
    peak = profile.peak_info.total_bytes if profile.peak_info is not None else 0
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    modelled = list(profile.device.modelled)
    if device == "cuda":
        if not any("rounding" in m for m in modelled):
            modelled.append(f"allocator rounding to {CUDA_BLOCK_BYTES}-byte blocks")
        modelled.append(
            f"CUDA context reserve of {format_bytes(context)} (0.3-2 GiB in practice), added "
            "to device_total_bytes, not to the tensors")
        modelled.append("optimizer built with foreach=True, torch's default on CUDA")
        modelled.append("run on fake CPU tensors: CPU kernels choose the intermediates "
                        "(attention uses the CPU flash/sdpa kernel)")
        if profile.allocator is not None:
            modelled.append(
                "reserved memory: the step's allocations replayed through a model of the CUDA "
                "caching allocator (memprof.allocator; one stream, options "
                f"{profile.allocator.get('conf') or 'default'}); the fit verdict counts it")
        else:
            modelled.append(
                "fragmentation of the caching allocator is not in the tensor figures; a fit "
                f"verdict keeps {FRAGMENTATION_FRACTION:.0%} of the memory left after the "
                "context for it")
    if mixed_precision:
        modelled.append(f"mixed precision through CPU autocast to {mixed_precision}")
    profile.device = dataclasses.replace(profile.device, modelled=modelled)
    info: dict[str, Any] = {
        "model": spec.name if spec is not None else None,
        "description": spec.description if spec is not None else None,
        "mode": "inference" if inference else "training",
        "optimizer": optimizer,
        "dtype": "fp32" if mixed_precision else dtype,
        "mixed_precision": mixed_precision,
        "device": device,
        "steps": steps,
        "context_len": context_len,
        "kv_cache_bytes": kv_cache_bytes,
        "num_parameters": num_params,
        "parameter_bytes": param_bytes,
        "peak_bytes": peak,
        "cuda_context_bytes": context,
        "device_total_bytes": peak + context,
        "modelled": modelled,
    }
    cached = replay_cached_bytes(profile.allocator)
    if cached is not None and profile.allocator is not None:
        replay = profile.allocator["replay"]
        info["reserved_bytes"] = replay["reserved_peak_bytes"]
        info["fragmentation_bytes"] = replay["fragmentation_bytes"]
        info["largest_free_block_bytes"] = replay["largest_free_block_bytes"]
        if device == "cuda":
            info["device_total_bytes"] = replay["reserved_peak_bytes"] + context
    if gpu is not None and budget is not None:
        info["fit"] = fit_verdict(peak, gpu, budget=budget, cached_bytes=cached)
    profile.meta["estimate"] = info
    return profile


def _gpu_budget(gpu: str) -> tuple[int, str]:
    """The memory of ``gpu``: a name, or a size, as :func:`memprof.gpus.resolve_budget` reads.

    Raises :class:`~memprof.errors.UnknownGPUError` for a name the catalog lacks and
    :class:`~memprof.errors.BudgetError` for text that is neither.
    """
    from memprof.gpus import resolve_budget

    budget, description = resolve_budget(gpu)
    return int(budget), str(description)


def fit_verdict(tensor_bytes: int, gpu: str, *, budget: tuple[int, str] | None = None,
                cached_bytes: int | None = None) -> dict[str, Any]:
    """Whether a step whose tensors peak at ``tensor_bytes`` fits ``gpu``.

    ``usable_bytes`` comes from :func:`memprof.gpus.budget_of`, the one budget function the
    advisor's plan uses too: the device's memory (as its driver reports it) less the CUDA
    context and the allocator's reserve: with ``cached_bytes`` (reserved minus allocated in
    the allocator replay) that replay's, else a fixed share. ``needed_bytes`` is the tensors
    plus that reserve plus the context, ``headroom_bytes`` what is left of ``usable_bytes``.
    ``budget`` (total bytes and label, from :func:`_gpu_budget`) is only a name check already
    made; the figures are budget_of's.
    """
    del budget
    b = budget_of(gpu, cached_bytes=cached_bytes)
    return {
        "gpu": gpu,
        "budget_bytes": b.total_bytes,
        "budget": b.label,
        "usable_bytes": b.usable_bytes,
        "usable": b.describe(),
        "needed_bytes": tensor_bytes + (cached_bytes or 0) + CUDA_CONTEXT_BYTES,
        "reserve": "allocator replay" if cached_bytes is not None
        else f"{FRAGMENTATION_FRACTION:.0%} fragmentation share",
        "fits": tensor_bytes <= b.usable_bytes,
        "headroom_bytes": b.usable_bytes - tensor_bytes,
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
