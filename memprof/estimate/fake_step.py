"""The estimate itself: build the model, its optimizer and batch under FakeTensorMode and
profile a training (or inference) step with memprof's ordinary Profiler (see
:mod:`memprof.estimate` for what is modelled rather than measured)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memprof.errors import EstimateError, MemprofError
from memprof.estimate.build_values import (
    BUILD_CONSTANT_ELEMENTS,
    known_values,
    values_while_building,
)
from memprof.estimate.catalog import ModelSpec
from memprof.estimate.conversions import fake_module_conversion
from memprof.estimate.failures import one_line, user_code
from memprof.estimate.grad_accumulation import InPlaceGradSums
from memprof.estimate.loading import resolve_batch
from memprof.estimate.options import EstimateOptions
from memprof.estimate.verdict import annotate, gpu_budget
from memprof.fake_kernels import active as cpu_fake_kernels
from memprof.fake_scalars import ScalarStandIns
from memprof.profile import Profile
from memprof.training_step import StagePlan, training_step


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
    model_factory: Callable[[], nn.Module] | ModelSpec, *, batch: Any, **options: Any
) -> Profile:
    """:func:`estimate_step`'s profile (see there for the arguments)."""
    return estimate_step(model_factory, batch=batch, **options).profile


def estimate_step(
    model_factory: Callable[[], nn.Module] | ModelSpec, *, batch: Any,
    prepare: Callable[[nn.Module], nn.Module] | None = None, **options: Any
) -> EstimatedStep:
    """Profile the steps of a model that is never allocated: the Profile, and the fake model,
    optimizer and batch that made it.

    ``model_factory`` builds the model (inside FakeTensorMode, with ``dtype`` as the default
    dtype; floating parameters it made in another dtype are cast). ``batch`` is a dict of
    tensors (keyword arguments), a tensor or tuple (positional), or a callable returning one,
    called inside the fake mode; real tensors are converted to fake ones. ``options`` are the
    fields of :class:`~memprof.estimate.options.EstimateOptions` (``optimizer``, ``dtype``,
    ``mixed_precision``, ``device``, ``gpu``, ``steps``, ``inference``, ``context_len``,
    ``loss_fn``), which says what each does. ``prepare`` turns the built (fake) model into the
    one the steps train, before the optimizer is made over its trainable parameters: a
    fine-tuning set-up such as LoRA adapters (``memprof estimate --lora``).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.tracking.session import Profiler

    opts = EstimateOptions(**options)
    spec = model_factory if isinstance(model_factory, ModelSpec) else None
    factory: Callable[[], nn.Module] = (
        model_factory.factory if isinstance(model_factory, ModelSpec) else model_factory
    )
    # a bad GPU name fails before the work
    budget = gpu_budget(opts.gpu) if opts.gpu is not None else None
    param_dtype = opts.parameter_dtype
    kv_cache_bytes: int | None = None

    # a CPU step: the fake kernels of what the CPU kernels run (an fp32 expert matmul)
    kernels = cpu_fake_kernels() if opts.device == "cpu" else contextlib.nullcontext()
    with kernels, FakeTensorMode(allow_non_fake_inputs=False) as fake_mode:
        model = _build_model(factory, param_dtype)
        if prepare is not None:
            with user_code("preparing the model"):
                model = prepare(model)
        opt = None if opts.inference else _make_optimizer(opts.optimizer, model,
                                                          cuda=opts.device == "cuda")
        # the batch's values (labels) and the step's small values are real, as while building:
        # a CTC loss reads its labels' lengths and maximum, wav2vec2's LayerDrop a random draw
        with known_values(fake_mode) as factories:
            with _default_dtype(param_dtype), user_code("the batch function"):
                data = batch() if callable(batch) else batch
            data = _to_fake(fake_mode, resolve_batch(data, model))
            if factories is not None:
                factories.elements = 1  # in the step: scalars (a LayerDrop draw)
            autocast_dtype = opts.autocast_dtype

            def step_loss(model: nn.Module, data: Any) -> torch.Tensor:
                # autocast covers the model's call; the loss of its output is taken outside
                with (torch.autocast("cpu", dtype=autocast_dtype)
                      if autocast_dtype is not None else contextlib.nullcontext()):
                    output = _call(model, data)
                return _loss(output, opts.loss_fn)

            with (user_code("the step under fake tensors"),
                  Profiler(model, opt, round_to=opts.round_to,
                           device_modelled=opts.device) as prof):
                for _ in range(opts.steps):
                    if opts.inference:
                        kv_cache_bytes = _inference_step(model, data, spec, opts.context_len,
                                                         autocast_dtype)
                    else:
                        _training_step(model, opt, data, step_loss)
                    prof.step()
        profile = prof.profile
        num_params, param_bytes = _count_parameters(model)

    profile = annotate(
        profile, spec=spec, options=opts, kv_cache_bytes=kv_cache_bytes,
        num_params=num_params, param_bytes=param_bytes, budget=budget,
    )
    return EstimatedStep(profile=profile, model=model, optimizer=opt, batch=data,
                         loss=step_loss, inference=opts.inference)


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
    # does) never materialises fp32 weights; a factory's own module.to() converts without
    # swapping fake tensors (estimate.conversions: peft's get_peft_model calls it).
    try:
        mode = _active_fake_mode()
        with _default_dtype(dtype), torch.device("cpu"), _skip_weight_init(), \
                _deepcopy_in_mode(mode), values_while_building(mode), fake_module_conversion():
            model = factory()
    except MemprofError:
        raise
    except Exception as exc:  # the user's factory failed
        raise EstimateError(f"the model factory failed: {one_line(exc)}") from exc
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        model = model[0]
    if not isinstance(model, nn.Module):
        raise EstimateError(f"the model factory returned {type(model).__name__}, "
                            "not a torch.nn.Module")
    _cast_parameters(model, dtype)
    return model


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Skip transformers' weight initialisation: values do not matter to memory, and some
    initialisers (``trunc_normal_``) branch on values, which fake tensors do not have.

    ``no_init_weights`` also skips the weight tying that ``init_weights`` does, which left
    tied embeddings and output layers as separate parameters (and optimizer state) wherever a
    model holds a transformers model below its root: the tying part of ``init_weights`` is
    kept, run where the real constructor runs it."""
    module = sys.modules.get("transformers")
    if module is None:
        yield
        return
    try:
        from transformers.initialization import no_init_weights
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # pragma: no cover - older transformers
        yield
        return

    def tie_only(self: Any) -> None:
        try:
            self.tie_weights(recompute_mapping=False)
        except TypeError:  # pragma: no cover - a tie_weights without that argument
            self.tie_weights()

    with no_init_weights():
        skipped = PreTrainedModel.init_weights
        PreTrainedModel.init_weights = tie_only  # type: ignore[method-assign]
        try:
            yield
        finally:
            PreTrainedModel.init_weights = skipped  # type: ignore[method-assign]


def _active_fake_mode() -> Any:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def _deepcopy_in_mode(mode: Any) -> contextlib.AbstractContextManager[Any]:
    """``copy.deepcopy`` of the estimate's fake tensors, made in the estimate's fake mode.

    PyTorch's own deepcopy of a fake tensor makes the copy in another fake mode, so a model
    that clones a layer by deepcopy while it is built (``nn.Transformer``,
    ``nn.TransformerEncoder``) failed at its next use of the copy ("Mixing fake modes NYI",
    an AssertionError). Values do not matter: the copy is an empty tensor of the same
    layout, a parameter where the original is one."""
    if mode is None:
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.overrides import TorchFunctionMode

    class DeepcopyInMode(TorchFunctionMode):
        def __torch_function__(  # type: ignore[no-untyped-def]
            self, func, types, args=(), kwargs=None
        ):
            if func is not torch.Tensor.__deepcopy__ or not isinstance(args[0], FakeTensor) \
                    or args[0].fake_mode is not mode:
                return func(*args, **(kwargs or {}))
            tensor, memo = args
            if id(tensor) in memo:
                return memo[id(tensor)]
            with torch.no_grad():
                copied = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                             device=tensor.device)
            copied.requires_grad_(tensor.requires_grad)
            if getattr(tensor, "_is_param", False):  # nn.Parameter of a tensor subclass
                copied._is_param = True
            memo[id(tensor)] = copied
            return copied

    return DeepcopyInMode()


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
            # a small real tensor keeps its values, as one the batch function makes
            small = value.device.type == "cpu" and value.numel() <= BUILD_CONSTANT_ELEMENTS
            return mode.fake_tensor_converter.from_real_tensor(mode, value, make_constant=small)
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


def _training_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, data: Any,
                   step_loss: Callable[[nn.Module, Any], torch.Tensor]) -> None:
    """One step of :func:`~memprof.training_step.training_step`: the loss dropped after its
    backward (nothing reads it), Adafactor's read values stood in for; with no optimizer, the
    model's ``zero_grad`` clears the gradients."""
    model.train()
    plan = StagePlan(lambda model, data, carry: step_loss(model, data),
                     () if optimizer is None else (0,), "after", True)
    training_step(model, data, [plan], [optimizer], hold_loss=False,
                  around_backward=InPlaceGradSums,  # the engine's in-place sums, skipped on fakes
                  step_optimizer=_step)


def _step(optimizer: torch.optim.Optimizer) -> None:
    with ScalarStandIns() if isinstance(optimizer, _VALUE_READING_OPTIMIZERS) else (
        contextlib.nullcontext()
    ):
        optimizer.step()


def _inference_step(
    model: nn.Module, data: Any, spec: ModelSpec | None, context_len: int | None,
    autocast_dtype: torch.dtype | None,
) -> int | None:
    """Prefill (and one decoding step with the KV cache where the model has one)."""
    model.eval()
    cached = isinstance(data, Mapping) and "input_ids" in data and _uses_cache(model, spec)
    with torch.no_grad(), (torch.autocast("cpu", dtype=autocast_dtype)
                           if autocast_dtype is not None else contextlib.nullcontext()):
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
