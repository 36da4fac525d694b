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

The package, one job a module: :mod:`~memprof.estimate.catalog` (the built-in shapes, ModelSpec,
synthetic batches), :mod:`~memprof.estimate.loading` (a ModelSpec from a name, a config or user
code), :mod:`~memprof.estimate.fake_step` (the step under fake tensors),
:mod:`~memprof.estimate.options` (the estimate's options, checked),
:mod:`~memprof.estimate.verdict` (what was modelled, the fit verdict),
:mod:`~memprof.estimate.failures` (the user's code failing, as one line),
:mod:`~memprof.estimate.build_values` (values a constructor reads, computed for real),
:mod:`~memprof.estimate.conversions` (a factory's ``module.to()`` of fake parameters) and
:mod:`~memprof.estimate.grad_accumulation` (autograd's in-place gradient sums, which it skips
on fake tensors).
"""

from __future__ import annotations

# `X as X`: importable from here as before the split, though not in __all__.
from memprof.errors import EstimateError
from memprof.estimate.catalog import BATCH_KINDS as BATCH_KINDS
from memprof.estimate.catalog import KNOWN_MODELS, ModelSpec, synthetic_batch
from memprof.estimate.fake_step import EstimatedStep, estimate, estimate_step
from memprof.estimate.loading import build_spec
from memprof.estimate.loading import spec_from_config as spec_from_config
from memprof.estimate.options import DEVICES as DEVICES
from memprof.estimate.options import DTYPES, OPTIMIZERS, EstimateOptions
from memprof.estimate.verdict import CUDA_CONTEXT_BYTES
from memprof.estimate.verdict import fit_verdict as fit_verdict

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "DTYPES",
    "KNOWN_MODELS",
    "OPTIMIZERS",
    "EstimateError",
    "EstimateOptions",
    "EstimatedStep",
    "ModelSpec",
    "build_spec",
    "estimate",
    "estimate_step",
    "synthetic_batch",
]
