"""A pattern zoo beside the model zoo: training patterns that break naive memory profilers.

    python benchmarks/patterns.py [--only NAME ...] [--steps 3] [--backends events dispatch]
                                  [--estimate] [--advice]

Each pattern is a small real workload run for a few CPU steps (sparse embeddings with
SparseAdam, a dead graph branch, a tiny Mamba and Mixtral from transformers, a GAN with two
optimizers, gradient accumulation, torch.compile with inductor, a UNet with GroupNorm and skip
concatenations, CTC speech, a peft LoRA model, DDP's ``no_sync`` in one gloo process, a loss
computed in chunks). Per pattern and
backend it prints:

* ``crash``: whether profiling raised (the unprofiled run must not);
* ``peak``: memprof's peak above the step's start against the allocator's own events (memprof's
  C++ recorder, or torch.profiler's allocation events, read in a separate run with no memprof
  hook installed), as the error over the step's peak (target: within 0.1%);
* ``persistent``: memprof's live bytes at the last step's end against a hand count of what the
  loop keeps (parameters, buffers, ``.grad``, optimizer state, the batch), storage by storage;
* ``bitwise``: losses and final parameters equal to the unprofiled run's;
* ``freed``: the model dies with its last reference once the profile is dropped (weak
  references, no ``gc``; ``gc`` named where the model has reference cycles of its own, which
  the unprofiled run needs collected as well);
* ``hooks``: no global module or optimizer hook, saved-tensor hook, dispatch mode or gradient
  hook left behind;
* with ``--estimate``, under the events row: ``memprof.estimate`` of the same step (fake
  tensors, fp32, CPU, AdamW) against the real run's peak, or the one line why it cannot run;
* with ``--advice`` (instead of the table): per pattern, every row of ``memprof.advise`` on
  its events profile with the loop as a Workload (simulated on copies): technique, options,
  ``predicted_by``, predicted against measured peak, and a verdict (see ``advice_verdict``):
  ``within`` 3%, ``explained`` (not applicable, ``not_simulated``, or off with the row's own
  reason), ``failed`` (its simulation raised) or ``off``; then a summary; a pattern whose step
  is not a Workload (DDP's process group) says why it is skipped;
* ``mode%`` (dispatch rows): the allocator's own peak of the same step when a no-op Python
  dispatch mode is active, against the unprofiled one: what the dispatch backend's mode does
  to the run itself.

Advisor rows against their simulations, ``python benchmarks/patterns.py --advice --only NAME``
(one pattern per process; 2026-12-07, 2-core CPU; "before" is main at 1695620, with today's
verdicts; within = predicted within 3% of the simulation):

==================  ====  ===========  ===  =========  ======
pattern             rows  within       off  explained  failed
==================  ====  ===========  ===  =========  ======
dead-branch         36    29 -> 32     0    4          0
grad-accumulation   35    31           0    4          0
chunked-loss        35    31           0    4          0
unet-groupnorm      32    24           0    8          0
torch-compile       35    20 -> 30     1    4          0
peft-lora           36    25 -> 28     1    7          0
mamba               36    4            0    24 -> 32   8 -> 0
mixtral-moe         36    18 -> 31     1    4          0
ctc-speech          34    17           12   5          0
sparse-embedding    36    18 -> 21     0    8 -> 15    10 -> 0
gan-two-optimizers  37    0 -> 33      0    4          0
ddp-no-sync         skipped: a process group (sharding rows need a fake one of their own)
==================  ====  ===========  ===  =========  ======

What changed and what is left:
* torch-compile: rows naming modules (checkpointing, offload, pruning, LoRA, QLoRA,
  quantization) raised ``KeyError: '_orig_mod.0'`` on the plain model's Workload: names now
  resolve through compiled wrappers (``advisor.core.ModuleNames``). Left: LoRA r8 +4.0%
  (7,160 B): not compilation, an eager simulation of the same row measures the same 179,008 B;
  the fake run is above both; cause not found (r16 +2.7%, r64 0.0%).
* mixtral-moe: no fake run could run (``torch._grouped_mm``'s meta kernel demands bf16, the CPU
  kernel runs fp32), so every row was analytic, 5-43% off: ``memprof/fake_kernels.py``. Left:
  ZeRO-3 on 8 ranks -6.7%: the events-backend simulation is 290 kB above the dispatch-ledger
  simulation of the same change (4,047,052 B, the fake run's within 0.01%), ranks 2 and 4
  agree; cause not found.
* dead-branch, peft-lora: ZeRO-2 rows 3-14% off. Cause in the simulation: its first no-grad
  forward leaves FSDP2's modules holding their gathered parameters when profiling starts, so
  the shards no operator touches (a parameter with no gradient, a frozen base) were never
  counted; the registry now registers FSDP2's sharded parameters too.
* mamba: every fake-run row 5-8% above its simulation: the fake run runs under a dispatch mode,
  under which the scan's gradients are summed out of place (+253,952 B, below). Not fixable by
  a dispatch-mode run; each such row now says it (the unchanged fake run's gap to the profile,
  ``advisor.FAKE_BASELINE_GAP``). int8/int4 and ``prune.l1_unstructured`` failed: the mixer's
  slow path reads ``dt_proj.weight`` directly (``dt_proj.weight @ ...``) and never runs its
  forward, so a quantized weight is no float tensor and the pruned weight prune made once, with
  its graph, was reused every step ("backward through the graph a second time"). Both rows now
  leave out a layer whose forward never ran (the profile's ``forward_calls``; the prune row
  names them) and run, explained by the +6.1% gap above (``advisor.core.weight_read_directly``:
  a layer whose forward never ran while its parent's did; a compiled model's modules, which no
  hook sees, are not). LoRA/QLoRA (5 rows) failed with peft's ValueError: peft refuses
  ``out_proj`` and ``conv1d`` on Mamba models; the rows now leave them (and ``dt_proj``, whose
  adapter would never be used and whose NF4 weight cannot be read directly) out, with a caveat.
* peft-lora: QLoRA and weight quantization of a model already carrying peft adapters raised in
  every simulation and fake run; they are not applicable now, with the reason. Left: structured
  pruning, analytic 30.8% off (its fake run cannot swap a peft-wrapped ``Conv1D.weight``).
* ctc-speech: no fake run can run (wav2vec2's CTC loss reads ``labels.max()``), so the rows are
  analytic, 3-45% off (mixed precision 39-45%: the analytic model of autocast on this
  convolutional front end); each row now says why it is analytic. Not fixed.
* sparse-embedding, gan-two-optimizers: were skipped, as a Workload was one model, one
  optimizer and one loss. A Workload now takes ``stages`` (``advisor.workload.Stage``: a loss,
  the optimizers stepped on its gradients, and whether they zero_grad before the loss or after
  their step); simulations and fake runs run every stage and copy every optimizer. The GAN is
  D's stage then G's, each zeroing first (both models' gradients live between steps). Sparse:
  one backward, then SparseAdam and Adam (2026-12-07, after the merge of main at 2af90cc).
  - gan: 33 of 37 within 3% (worst LoRA r64 1.66%); the 4 others are not applicable.
  - sparse: a fake sparse gradient held no entries (PyTorch's fake kernels cannot know how
    many), so the fake run was 9.5% below: fake runs now give it one entry per index, as the
    CPU kernel does, and coalesce, clone, sparse_mask and casts keep them
    (``memprof/fake_kernels.py``); the ledger counts such fake sparse tensors (PyTorch's own,
    empty ones stay "not counted"). The unchanged fake run is then +0.27% (coalesce keeps the
    duplicates an upper bound). LoRA/QLoRA adapters took SparseAdam (the first group's
    optimizer), which refuses dense gradients: they now take the optimizer of the layer they
    adapt (5 rows, 0.00%). The 10 failed (2026-12-07, later): ZeRO-1 (3) wrapped every
    optimizer in the first one's class, SparseAdam, which refuses the head's dense gradients:
    each optimizer is now its own ZeroRedundancyOptimizer (``SimState.wrap_optimizer``), 3 fake
    runs within 0.27%. ZeRO-2/3 (6: ``fsdp::chunk_cat`` has no SparseCPU kernel) and Adafactor
    (1: no sparse support) are not applicable, with the reason (the profile's optimizers record
    how many trained tensors get sparse gradients).

Targets per pattern (``python benchmarks/patterns.py --estimate``, 2026-12-07, 2-core CPU,
at 993fbdc; "ok" = met; each miss with its figure):

==================  =====  ===========================  ==========  =====  =================
pattern             crash  peak (0.1%)                  persistent  alive  estimate (1%)
==================  =====  ===========================  ==========  =====  =================
sparse-embedding    ok     ok                           ok          ok     not estimable (1)
dead-branch         ok     ok                           ok          ok     -0.007%
mamba               ok     dispatch +5.715% (2)         ok          ok     -0.000%
mixtral-moe         ok     ok                           ok          ok     -0.001% (3)
gan-two-optimizers  ok     ok                           ok          ok     not estimable (1)
grad-accumulation   ok     ok                           ok          ok     not estimable (1)
ddp-no-sync         ok     ok (4)                       ok          ok     not estimable (1)
torch-compile       ok     ok (5)                       ok          ok     not estimable (1)
unet-groupnorm      ok     ok                           ok          ok     -0.000%
ctc-speech          ok     ok (6)                       ok          ok     -0.000% (6)
peft-lora           ok     ok                           ok          ok     -0.005% (7)
chunked-loss        ok     ok                           ok          ok     not estimable (1)
==================  =====  ===========================  ==========  =====  =================

(1) the step is not estimate's (forward, loss of the output, one backward, AdamW): the table
prints why per pattern. (2) a dispatch mode changes the run itself (below). (3) refused
before: ``estimate`` of a CPU step now runs ``memprof/fake_kernels.py``. (4) was events
+14.329% at step 1: DDP's bucket made before profiling (below; 2026-12-07, later: +0.000%,
dispatch -0.005%).
(5) results bitwise: the dispatch run of the compiled model is not, nor is a run under a
no-op dispatch mode, which it equals (dynamo compiles another graph under a mode). (6) the
pattern runs with LayerDrop off (below); the estimate refused at ``labels.max()``: the batch's
values are now known to the fake run, and CTC has fake kernels for known target lengths
(``memprof/fake_kernels.py``). (7) refused before: peft's
``get_peft_model`` calls ``.to()``, which swaps fake tensors and fails under any FakeTensorMode
(``_apply(): Couldn't swap Linear.weight``); the estimate's build converts without swapping
(``memprof/estimate/conversions.py``).

Where the two backends part (``mode%``: the run itself under a no-op dispatch mode), measured
2026-12-07:
* mamba +5.715%, mode% +5.715%: the mode changes the run, memprof counts it right. While any
  Python dispatch mode is active PyTorch treats every tensor as a subclass and autograd
  accumulates gradients out of place: the slow-path scan's 32 ``select`` gradients summed into
  one buffer keep one more buffer alive (253,952 B). No dispatch-mode profiler can avoid it;
  ``estimate`` (a dispatch mode over fake tensors) is +5.1% on the same model for this reason
  (tests/test_tracking_patterns.py, ``..._its_mode_changing_the_run``).
* ddp-no-sync: it was the reference, not the dispatch backend. The allocator's event source
  reports no free of a block allocated before it started (checked: ``torch.empty`` before
  ``start()``, ``del`` after, no event), and DDP's first gradient bucket (37,408 B, the size
  ``_get_ddp_logging_data()["bucket_sizes"]`` reports) is made by its constructor and freed in
  step 1, when the second iteration's ``_pre_forward`` calls ``reducer._rebuild_buckets()`` (C++
  ``Reducer::initialize_buckets`` makes the new one: an ``aten.empty`` a dispatch mode sees).
  The reference now records from before the loop is built: step 1 is 102,964 B above its
  start like every later step. The events backend, reading the same source, showed
  +37,408 B (+14.3%) at step 1 only: it never counted the bucket made before profiling, so
  step 1's start was that much low while the new bucket counted. The dispatch backend was
  exact only because its mode saw the old bucket as the output of the copy into it in DDP's
  gradient hook, which the fix for #25's hang no longer lets it see (memprof's objects leave
  the thread state there: ``memprof/tracking/thread_state.py``). Now both enter the buckets
  a DDP module made before the profile from its reducer's own report of their sizes, and end
  them where DDP says it rebuilt them (``_has_rebuilt_buckets``, read at the next module's
  forward): events +0.000%, dispatch -0.005% (a scalar), both at every step
  (``BucketsBefore`` in ``memprof/tracking/distributed.py``; tests/test_ddp.py).
* ctc-speech (before LayerDrop was turned off in the pattern) -16.801%, mode% +0.000%: step
  1 skipped encoder layers (LayerDrop's random draw) and peaked inside the positional
  convolution's backward, whose kernel scratch (720,580 B) is no operator's output. With
  LayerDrop off every step peaks in attention's forward and both backends are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memprof
from memprof.tracking.events import default_source
from memprof.tracking.ledger import held_tensors

SEED = 0


@dataclass
class Loop:
    """One pattern's objects and its step: ``step(i)`` runs training step ``i`` and returns
    its loss; ``kept()`` the tensors the loop keeps between steps besides the models' and
    optimizers' own (the last batch)."""

    models: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    step: Callable[[int], torch.Tensor]
    kept: Callable[[], list[torch.Tensor]] = field(default=lambda: [])
    losses: list[torch.Tensor] = field(default_factory=list)  # what the runner keeps
    #: Bytes kept where no Python reference reaches them, counted by hand from what holds them
    #: (DDP's reducer: one flat bucket the size of the gradients).
    hidden: Callable[[], int] = field(default=lambda: 0)
    #: What ``memprof.estimate`` needs to run the same step on fake tensors: the batch maker
    #: and the loss of the model's output; or why the step is not one ``estimate`` runs
    #: (forward, loss of the output, backward, AdamW over the trained parameters).
    estimate: dict[str, Any] | str = "the step is not estimate's"
    #: The step as an advisor :class:`~memprof.advisor.workload.Workload` over the last batch
    #: (its ``step_fn`` computes the loss on the copy it is given), or why it is not one.
    workload: Callable[[], Any] | str = "the step is not one model and one optimizer"


@dataclass(frozen=True)
class Pattern:
    name: str
    build: Callable[[], Loop]
    needs: str | None = None


# ------------------------------------------------------------------ patterns
def _sparse_embeddings() -> Loop:
    class Recommender(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.EmbeddingBag(5000, 32, mode="sum", sparse=True)
            self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

        def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(indices, offsets))

    model = Recommender()
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2)
    dense = torch.optim.Adam(list(model.head.parameters()), lr=1e-3)
    batch: list[torch.Tensor] = []

    def loss_of(net: nn.Module, value: list[torch.Tensor], carry: dict[str, Any]
                ) -> torch.Tensor:
        return net(*value).pow(2).mean()

    def step(i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(i)
        batch[:] = [torch.randint(0, 5000, (256,), generator=gen), torch.arange(0, 256, 8)]
        loss = loss_of(model, batch, {})
        loss.backward()
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
        return loss.detach()

    from memprof.advisor.workload import Stage, Workload

    def workload() -> Workload:  # one backward, then both optimizers' steps
        return Workload(model, None, list(batch), stages=[Stage([sparse, dense], loss_of)])

    return Loop([model], [sparse, dense], step, lambda: list(batch), workload=workload,
                estimate="two optimizers (SparseAdam, Adam): estimate steps one AdamW")


def _dead_branch() -> Loop:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.A_log = nn.Parameter(torch.randn(64, 64))
            self.lin = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            A = -torch.exp(self.A_log)  # noqa: F841 - never used, as in Mamba's slow path
            return torch.relu(self.lin(x)) + x

    model = nn.Sequential(*[Block() for _ in range(4)])
    return _simple(model, torch.optim.AdamW(model.parameters()), lambda g: torch.randn(16, 64,
                                                                                      generator=g))


def _simple(model: nn.Module, optimizer: torch.optim.Optimizer,
            make: Callable[[torch.Generator], Any],
            loss_of: Callable[[nn.Module, Any], torch.Tensor] | None = None,
            not_estimable: str = "") -> Loop:
    batch: list[Any] = [None]

    def loss_on(net: nn.Module, value: Any) -> torch.Tensor:
        if loss_of is not None:
            return loss_of(net, value)
        if isinstance(value, dict):
            return net(**value).loss
        return net(value).float().pow(2).mean()

    def step(i: int) -> torch.Tensor:
        batch[0] = make(torch.Generator().manual_seed(i))
        loss = loss_on(model, batch[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def kept() -> list[torch.Tensor]:
        value = batch[0]
        if isinstance(value, dict):
            return [v for v in value.values() if isinstance(v, torch.Tensor)]
        return [value] if isinstance(value, torch.Tensor) else []

    # estimate's step: forward, ``output.loss`` or ``loss_fn(output)``, backward, AdamW over
    # the parameters that require gradients, zero_grad(set_to_none=True): the same as this
    # one's, or not estimable (``not_estimable`` says why, for a loss of the loop's own)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert isinstance(optimizer, torch.optim.AdamW) and trained == {
        id(p) for p in model.parameters() if p.requires_grad}, "not estimate's optimizer"
    assert (loss_of is None) != bool(not_estimable), "a loss of its own says why"
    estimate: dict[str, Any] | str = not_estimable or {
        "make": make, "loss_fn": lambda out: out.float().pow(2).mean()}
    from memprof.advisor.workload import Workload

    def workload() -> Workload:
        return Workload(model, optimizer, batch[0], step_fn=loss_on)

    return Loop([model], [optimizer], step, kept, estimate=estimate, workload=workload)


def _lm_batch(vocab: int, seq: int = 32) -> Callable[[torch.Generator], dict[str, Any]]:
    def make(gen: torch.Generator) -> dict[str, Any]:
        ids = torch.randint(0, vocab, (2, seq), generator=gen)
        return {"input_ids": ids, "labels": ids}

    return make


def _mamba() -> Loop:
    import transformers

    config = transformers.MambaConfig(vocab_size=256, hidden_size=64, state_size=8,
                                      num_hidden_layers=2, expand=2, conv_kernel=4)
    model = transformers.MambaForCausalLM(config)
    return _simple(model, torch.optim.AdamW(model.parameters()), _lm_batch(256))


def _mixtral() -> Loop:
    import transformers

    options: dict[str, Any] = {"attn_implementation": "eager"}
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, **options)
    model = transformers.MixtralForCausalLM(config)
    return _simple(model, torch.optim.AdamW(model.parameters()), _lm_batch(256))


class _GAN(nn.Module):
    """A generator and its discriminator; calling it generates (so it is the profile's root)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 64))
        self.disc = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(z)


def _gan() -> Loop:
    gan = _GAN()
    opt_g = torch.optim.Adam(gan.gen.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(gan.disc.parameters(), lr=2e-4)
    bce = nn.BCEWithLogitsLoss()
    batch: list[torch.Tensor] = []

    def d_loss(net: nn.Module, value: list[torch.Tensor], carry: dict[str, Any]
               ) -> torch.Tensor:
        real, z = value
        carry["fake"] = fake = net(z)  # G's output, reused by G's stage
        on_real, on_fake = net.disc(real), net.disc(fake.detach())
        return bce(on_real, torch.ones_like(on_real)) + bce(on_fake, torch.zeros_like(on_fake))

    def g_loss(net: nn.Module, value: list[torch.Tensor], carry: dict[str, Any]
               ) -> torch.Tensor:
        on_fake = net.disc(carry["fake"])
        return bce(on_fake, torch.ones_like(on_fake))

    def step(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        batch[:] = [torch.randn(32, 64, generator=g), torch.randn(32, 16, generator=g)]
        carry: dict[str, Any] = {}
        opt_d.zero_grad()
        loss = d_loss(gan, batch, carry)
        loss.backward()
        opt_d.step()
        del loss
        opt_g.zero_grad()  # D's gradients from G's backward stay alive until the next step
        loss = g_loss(gan, batch, carry)
        loss.backward()
        opt_g.step()
        return loss.detach()

    from memprof.advisor.workload import Stage, Workload

    def workload() -> Workload:  # D's step, then G's, each zeroing its gradients first
        return Workload(gan, None, list(batch),
                        stages=[Stage([opt_d], d_loss, zero_grad="before"),
                                Stage([opt_g], g_loss, zero_grad="before")])

    return Loop([gan], [opt_g, opt_d], step, lambda: list(batch), workload=workload,
                estimate="two optimizers and two backward passes (D's, G's): estimate runs one "
                         "of each")


def _accumulation() -> Loop:
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    batch: list[torch.Tensor] = []

    def step(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        batch[:] = [torch.randn(64, 64, generator=g), torch.randint(0, 8, (64,), generator=g)]
        x, y = batch
        total = torch.zeros(())
        for part in range(4):
            rows = slice(16 * part, 16 * part + 16)
            loss = F.cross_entropy(model(x[rows]), y[rows]) / 4
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def micro_batches(net: nn.Module, value: list[torch.Tensor]) -> torch.Tensor:
        """The same step for the advisor: three micro-batches backward here, the fourth's loss
        returned for the Workload's own backward."""
        x, y = value
        for part in range(3):
            rows = slice(16 * part, 16 * part + 16)
            (F.cross_entropy(net(x[rows]), y[rows]) / 4).backward()
        return F.cross_entropy(net(x[48:]), y[48:]) / 4

    from memprof.advisor.workload import Workload

    def workload() -> Workload:
        return Workload(model, optimizer, list(batch), step_fn=micro_batches)

    return Loop([model], [optimizer], step, lambda: list(batch), workload=workload,
                estimate="4 micro-batches per optimizer step: estimate runs one backward per "
                         "step")


def _ddp_no_sync() -> Loop:
    """DDP (one process, gloo) accumulating over 2 micro-batches under ``no_sync``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0,
                                world_size=1)
    inner = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    model = DistributedDataParallel(inner)
    optimizer = torch.optim.AdamW(model.parameters())
    batch: list[torch.Tensor] = []

    def step(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        batch[:] = [torch.randn(32, 64, generator=g), torch.randint(0, 8, (32,), generator=g)]
        x, y = batch
        with model.no_sync():
            first = F.cross_entropy(model(x[:16]), y[:16]) / 2
            first.backward()
        second = F.cross_entropy(model(x[16:]), y[16:]) / 2
        second.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return first.detach() + second.detach()

    def buckets() -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    return Loop([model], [optimizer], step, lambda: list(batch), hidden=buckets,
                estimate="DDP over a process group (its reducer's buckets): estimate runs the "
                         "module alone",
                workload="DDP's no_sync step over a process group: a Workload's deep copy of "
                         "the DDP module is not a step the advisor can simulate (its sharding "
                         "rows run on a fake process group of their own, which cannot start "
                         "while the loop's gloo group is initialized)")


def _compiled() -> Loop:
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(),
                          nn.Linear(64, 8))
    compiled = torch.compile(model, backend="inductor")
    optimizer = torch.optim.AdamW(model.parameters())
    return _simple(model, optimizer, lambda g: torch.randn(32, 64, generator=g),
                   loss_of=lambda net, x: _compiled_copy(net, model, compiled)(x).pow(2).mean(),
                   not_estimable="a compiled model: estimate runs the model eagerly on fake "
                                 "tensors, not inductor's kernels")


def _compiled_copy(net: nn.Module, model: nn.Module, compiled: Any) -> Any:
    """The compiled model for the loop's own model, a compiled module for a copy (the
    advisor's simulations run on deep copies)."""
    if net is model:
        return compiled
    if net not in _COMPILED_COPIES:
        _COMPILED_COPIES[net] = torch.compile(net, backend="inductor")
    return _COMPILED_COPIES[net]


_COMPILED_COPIES: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class _UNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU())

        self.down1, self.down2 = block(3, c), block(c, 2 * c)
        self.mid = block(2 * c, 2 * c)
        self.up2, self.up1 = block(4 * c, c), block(2 * c, c)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        m = self.mid(F.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(m, scale_factor=2.0), d2], dim=1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), d1], dim=1))
        return self.out(u1)


def _unet() -> Loop:
    model = _UNet()
    return _simple(model, torch.optim.AdamW(model.parameters()),
                   lambda g: torch.randn(2, 3, 32, 32, generator=g))


def _ctc() -> Loop:
    import transformers

    config = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        ctc_loss_reduction="mean", pad_token_id=0, do_stable_layer_norm=True,
        feat_extract_norm="layer", mask_time_prob=0.0, layerdrop=0.0)
    # LayerDrop off: with it (0.1 by default) each step skips encoder layers at random, so the
    # real run's peak, and any comparison with it, depends on the random draws
    model = transformers.Wav2Vec2ForCTC(config)

    def make(gen: torch.Generator) -> dict[str, Any]:
        return {"input_values": torch.randn(2, 4000, generator=gen),
                "labels": torch.randint(1, 32, (2, 12), generator=gen)}

    return _simple(model, torch.optim.AdamW(model.parameters()), make)


def _lora() -> Loop:
    import peft
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    params = [p for p in model.parameters() if p.requires_grad]
    return _simple(model, torch.optim.AdamW(params), _lm_batch(256))


class _ChunkedLM(nn.Module):
    """A language model whose loss is computed in chunks: ``forward`` gives the hidden states,
    the head runs on 32 rows at a time (never all logits at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Embedding(512, 64), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 512, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(ids[:, :-1])


def _chunked_loss() -> Loop:
    def loss_of(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        hidden = net(ids).flatten(0, 1)
        targets = ids[:, 1:].flatten()
        total = torch.zeros(())
        for rows in torch.split(torch.arange(hidden.shape[0]), 32):
            logits = net.head(hidden[rows])
            total = total + F.cross_entropy(logits, targets[rows], reduction="sum")
        return total / targets.numel()

    model = _ChunkedLM()
    return _simple(model, torch.optim.AdamW(model.parameters()),
                   lambda g: torch.randint(0, 512, (4, 65), generator=g), loss_of=loss_of,
                   not_estimable="the loss runs the model's head in chunks outside its forward: "
                                 "estimate's loss_fn sees the output only")


PATTERNS = [
    Pattern("sparse-embedding", _sparse_embeddings),
    Pattern("dead-branch", _dead_branch),
    Pattern("mamba", _mamba, "transformers"),
    Pattern("mixtral-moe", _mixtral, "transformers"),
    Pattern("gan-two-optimizers", _gan),
    Pattern("grad-accumulation", _accumulation),
    Pattern("ddp-no-sync", _ddp_no_sync),
    Pattern("torch-compile", _compiled),
    Pattern("unet-groupnorm", _unet),
    Pattern("ctc-speech", _ctc, "transformers"),
    Pattern("peft-lora", _lora, "peft"),
    Pattern("chunked-loss", _chunked_loss),
]


# ----------------------------------------------------------------- measures
def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        for part in held_tensors(tensor):
            storage = part.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def hand_count(loop: Loop) -> int:
    """What the loop keeps between steps, storage by storage."""
    tensors: list[torch.Tensor] = []
    for model in loop.models:
        tensors.extend(model.parameters())
        tensors.extend(b for b in model.buffers() if b is not None)
        tensors.extend(p.grad for p in model.parameters() if p.grad is not None)
    for optimizer in loop.optimizers:
        for state in optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    tensors.extend(loop.kept())
    tensors.extend(loop.losses)
    return _storage_bytes(tensors) + loop.hidden()


class _NoopMode(TorchDispatchMode):
    """A dispatch mode that only runs each operator: what the dispatch backend's mode does to
    the run itself, without memprof."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def allocator_steps(pattern: Pattern, steps: int, *, under_mode: bool = False) -> list[int]:
    """Per step, the most bytes allocated above the step's start, from the allocator's own
    events (no memprof hook installed); ``under_mode``: with a no-op dispatch mode active.

    Recording starts before the loop is built: the event source reports no free of a block
    allocated before it started, and a step may free one (DDP's first bucket, made by its
    constructor, is freed when the reducer rebuilds its buckets in step 1: starting after
    the build counted that step 37,408 B high)."""
    torch.manual_seed(SEED)
    source = default_source()
    source.start()
    loop = pattern.build()
    source.mark(-1)  # the build's allocations: known, not a step
    with _NoopMode() if under_mode else contextlib.nullcontext():
        for i in range(steps):
            loop.step(i)
            source.mark(i)
    items = source.stop()
    peaks, live, start, most, open_ = [], 0, 0, 0, {}
    for _when, ptr, value in items:
        if ptr == -1:
            peaks.append(most - start)
            start = most = live
            continue
        if ptr < 0:
            continue
        if value > 0:
            open_[ptr] = value
            live += value
            most = max(most, live)
        elif ptr in open_:
            live -= open_.pop(ptr)
    return peaks[1:]


def estimated_peak(pattern: Pattern, loop: Loop) -> int | str:
    """``memprof.estimate``'s peak for the pattern's step (2 steps, fake tensors, fp32, CPU),
    or the one line saying why it cannot run."""
    from memprof.errors import MemprofError
    from memprof.estimate import estimate

    if isinstance(loop.estimate, str):
        return f"not estimable: {loop.estimate}"
    make, loss_fn = loop.estimate["make"], loop.estimate["loss_fn"]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level, fake_log.level = fake_log.level, logging.CRITICAL  # its traceback of a refusal
    try:
        with _quiet():
            profile = estimate(lambda: pattern.build().models[0],
                               batch=lambda: make(torch.Generator().manual_seed(1)),
                               optimizer="adamw", dtype="fp32", device="cpu", steps=2,
                               loss_fn=loss_fn)
    except MemprofError as exc:
        return f"refused: {str(exc).splitlines()[0][:120]}"
    finally:
        fake_log.setLevel(level)
    return profile.peak().total_bytes


def _hooks() -> tuple[Any, ...]:
    from torch.nn.modules import module as m
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (len(m._global_forward_pre_hooks), len(m._global_forward_hooks),
            len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks),
            torch._C._autograd._top_saved_tensors_default_hooks(False) is not None,
            _get_current_dispatch_mode() is not None)


def _run(pattern: Pattern, steps: int, backend: str | None, *, under_mode: bool = False
         ) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, Loop]:
    torch.manual_seed(SEED)
    loop = pattern.build()
    losses = loop.losses
    prof = memprof.profile(backend=backend) if backend else None  # type: ignore[arg-type]
    with prof if prof is not None else _NoopMode() if under_mode else contextlib.nullcontext():
        for i in range(steps):
            losses.append(loop.step(i))
            if prof is not None:
                prof.step()
    params = [p.detach().clone() for m in loop.models for p in m.parameters()]
    return losses, params, prof, loop


def _freed(loop: Loop) -> Callable[[], str]:
    """Drop the loop and say whether its models died (no gc, or only with gc)."""
    refs: list[weakref.ref[Any]] = [weakref.ref(p) for m in loop.models for p in m.parameters()]
    refs.append(weakref.ref(loop.models[0]))

    def verdict() -> str:
        if all(r() is None for r in refs):
            return "yes"
        gc.collect()
        return "gc" if all(r() is None for r in refs) else "ALIVE"

    return verdict


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check(pattern: Pattern, steps: int, backends: list[str], *, estimates: bool = False
          ) -> list[dict[str, Any]]:
    with _quiet():
        expected_losses, expected_params, _, loop = _run(pattern, steps, None)
        plain = _freed(loop)
        del loop
        plain_freed = plain()
        truth = allocator_steps(pattern, steps)
    rows = []
    for backend in backends:
        row: dict[str, Any] = {"pattern": pattern.name, "backend": backend}
        hooks_before = _hooks()
        started = time.perf_counter()
        try:
            with _quiet():
                losses, params, prof, loop = _run(pattern, steps, backend)
        except Exception as exc:  # the benchmark reports it, the user's run would have died
            row["crash"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            rows.append(row)
            continue
        row["seconds"] = time.perf_counter() - started
        row["crash"] = "no"
        profile = prof.profile
        stats = profile.steps_stats
        ours = [s.peak_bytes - s.start_bytes for s in stats]
        # step 0 starts before memprof has seen the models (no model is passed): from step 1 on
        # each step's start is known, and its peak is compared above that start
        worst = max(range(1, len(stats)),
                    key=lambda i: abs(ours[i] - truth[i]) / stats[i].peak_bytes)
        row["peak"] = stats[worst].peak_bytes
        row["peak_err_pct"] = 100.0 * (ours[worst] - truth[worst]) / stats[worst].peak_bytes
        row["peak_err_bytes"] = ours[worst] - truth[worst]
        row["worst"] = worst
        row["persistent"] = stats[-1].end_bytes
        row["peak_total"] = max(s.peak_bytes for s in stats[1:])  # what estimate's peak is
        if backend == "events" and estimates:
            row["estimate"] = estimated_peak(pattern, loop)
        row["hand"] = hand_count(loop)
        row["bitwise"] = _equal(losses, expected_losses) and _equal(params, expected_params)
        if not row["bitwise"] and backend == "dispatch":
            row["_results"] = (losses, params)  # against a no-op dispatch mode's, below
        row["warnings"] = [w for w in profile.warnings if "torch.compile" not in w]
        params_hooked = any(p._post_accumulate_grad_hooks for m in loop.models
                            for p in m.parameters())
        freed = _freed(loop)
        del loop, prof, profile
        row["freed"] = freed()
        if row["freed"] == "gc" and plain_freed == "gc":
            row["freed"] = "gc (as unprofiled)"
        row["hooks_left"] = _hooks() != hooks_before or params_hooked
        rows.append(row)
    # Last: a run under a mode leaves dynamo's state changed for the runs after it (a compiled
    # pattern's profiled run was no longer bitwise equal when this ran first).
    if any(r["backend"] == "dispatch" and "worst" in r for r in rows):
        with _quiet():
            moded = allocator_steps(pattern, steps, under_mode=True)
        for r in rows:
            if r["backend"] == "dispatch" and "worst" in r:
                i = r["worst"]  # the same step's real peak when a no-op mode is active
                r["mode_pct"] = 100.0 * (moded[i] - truth[i]) / r["peak"]
    for r in rows:
        if "_results" in r:  # does a no-op dispatch mode change them as much? (torch.compile)
            losses, params = r.pop("_results")
            with _quiet():
                moded_losses, moded_params, _, _ = _run(pattern, steps, None, under_mode=True)
            r["bitwise_as_mode"] = _equal(losses, moded_losses) and _equal(params, moded_params)
    return rows


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


ADVICE_TOLERANCE_PCT = 3.0


def advice_rows(pattern: Pattern, steps: int) -> list[dict[str, Any]] | str:
    """The advisor on the pattern's events-backend profile, every row simulated on copies of
    the loop's model and optimizer (``memprof.advise(..., workload=...)``); or why not."""
    with _quiet():
        _losses, _params, prof, loop = _run(pattern, steps, "events")
        if isinstance(loop.workload, str):
            return f"skipped: {loop.workload}"
        advice = memprof.advise(prof.profile, workload=loop.workload())
    return [dict(r) for r in advice.rows]


def advice_verdict(row: dict[str, Any]) -> tuple[str, str]:
    """(kind, the text) for one advisor row. Kinds: "within" (predicted within
    ADVICE_TOLERANCE_PCT of its simulation), "explained" (not compared, or off, with the row's
    own reason: not applicable, ``not_simulated``, or a fake run whose unchanged step already
    differs from the profile), "failed" (its simulation raised: the reason is an error, not an
    explanation) and "off" (off by more, or no prediction, with no reason)."""
    from memprof.advisor import FAKE_BASELINE_GAP

    error = row.get("error_pct")
    caveats = str(row.get("caveats") or "")
    if error is not None:
        text = (f"predicted {row['predicted_peak_bytes']} measured "
                f"{row['measured_peak_bytes']} err {error:.2f}%")
        if error <= ADVICE_TOLERANCE_PCT:
            return "within", text
        if FAKE_BASELINE_GAP in caveats:
            return "explained", text + "; " + caveats[caveats.index(FAKE_BASELINE_GAP):]
        failed = [c for c in caveats.split("; ") if "failed" in c]
        return "off", text + "".join(f"; {c}" for c in failed)
    if not row.get("applicable"):
        return "explained", f"not applicable: {row.get('reason')}"
    if row.get("not_simulated"):
        return "explained", f"not_simulated: {row['not_simulated']}"
    if "simulation failed" in caveats:
        return "failed", caveats[caveats.index("simulation failed"):]
    if caveats:
        return "off", f"not compared; caveats: {caveats}"
    if row.get("predicted_peak_bytes") is None:
        return "off", "no prediction and no reason"
    return "off", f"predicted {row['predicted_peak_bytes']}, not simulated and no reason"


def print_advice(pattern: Pattern, steps: int, width: int = 160) -> dict[str, int]:
    """Print the pattern's advisor rows and its summary; returns the summary's counts."""
    rows = advice_rows(pattern, steps)
    if isinstance(rows, str):
        print(f"{pattern.name:20} advice {rows}")
        return {}
    counts = {"within": 0, "off": 0, "explained": 0, "failed": 0}
    for row in rows:
        kind, text = advice_verdict(row)
        counts[kind] += 1
        options = ",".join(f"{k}={v}" for k, v in (row.get("options") or {}).items())
        print(f"{'':4}{kind:9} {row['technique']:16} {options[:40]:40} "
              f"{row.get('predicted_by')!s:18} {text[:width]}")
    print(f"{pattern.name:20} advice: {counts['within']} rows within "
          f"{ADVICE_TOLERANCE_PCT:g}%, {counts['off']} off, {counts['explained']} explain "
          f"themselves, {counts['failed']} failed")
    return counts


def _estimate_text(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The estimate against the real run; where it is off, also against the real run under a
    dispatch mode (the dispatch backend's row: the estimate runs under one too)."""
    est = row["estimate"]
    if isinstance(est, str):
        return est
    text = f"{100.0 * (est - row['peak_total']) / row['peak_total']:+.3f}%"
    moded = [r for r in rows if r["backend"] == "dispatch" and "peak_total" in r]
    if moded and abs(est - row["peak_total"]) > row["peak_total"] // 100:
        under = moded[0]["peak_total"]
        text += (f" (vs the run under a dispatch mode, as the estimate's: "
                 f"{100.0 * (est - under) / under:+.3f}%)")
    return text


PEAK_TOLERANCE_PCT = 0.1
ESTIMATE_TOLERANCE_PCT = 1.0


def target_verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One pattern's rows (one per backend) against the issue's targets: per target "ok" or
    what misses (the backend, the figure)."""
    ran = [r for r in rows if r["crash"] == "no"]
    crashed = [f"{r['backend']}: {r['crash']}" for r in rows if r["crash"] != "no"]

    def each(miss: Callable[[dict[str, Any]], str | None]) -> str:
        misses = [f"{r['backend']} {text}" for r in ran if (text := miss(r)) is not None]
        return "; ".join(misses) or ("ok" if ran else "-")

    def peak(r: dict[str, Any]) -> str | None:
        if abs(r["peak_err_pct"]) <= PEAK_TOLERANCE_PCT:
            return None
        text = f"{r['peak_err_pct']:+.3f}% ({r['peak_err_bytes']:+} B, step {r['worst']})"
        if abs(r.get("mode_pct", 0.0) - r["peak_err_pct"]) <= PEAK_TOLERANCE_PCT:
            text += ", as a no-op dispatch mode changes the run"  # counted right
        return text

    def alive(r: dict[str, Any]) -> str | None:
        problems = [x for x, bad in (("ALIVE", r["freed"] == "ALIVE"),
                                     ("hooks LEFT", r["hooks_left"])) if bad]
        return ", ".join(problems) or None

    out = {
        "crash": "; ".join(crashed) or "ok",
        "peak": each(peak),
        "persistent": each(lambda r: None if r["persistent"] == r["hand"] else
                           f"{r['persistent'] - r['hand']:+} B"),
        "alive": each(alive),
        "bitwise": each(lambda r: None if r["bitwise"] else "NO" + (
            " (as a no-op dispatch mode's run)" if r.get("bitwise_as_mode") else "")),
    }
    events = next((r for r in ran if "estimate" in r), None)
    if events is not None:
        est = events["estimate"]
        if isinstance(est, str):
            out["estimate"] = est
        else:
            err = 100.0 * (est - events["peak_total"]) / events["peak_total"]
            if abs(err) <= ESTIMATE_TOLERANCE_PCT:
                out["estimate"] = f"ok {err:+.3f}%"
            else:  # with the run under a dispatch mode, which the estimate runs under too
                out["estimate"] = f"MISS {_estimate_text(events, rows)}"
    return out


def print_targets(verdicts: dict[str, dict[str, str]]) -> None:
    """The targets table: per pattern, each target's verdict."""
    print(f"\ntargets: no crash; peak within {PEAK_TOLERANCE_PCT:g}% of the allocator's events; "
          "persistent bytes equal to the hand count; nothing alive (the model dies with its "
          "last reference, no hook left); results bitwise unchanged; estimate within "
          f"{ESTIMATE_TOLERANCE_PCT:g}% of the real run's peak or why not")
    print(f"{'pattern':20} {'crash':6} {'peak':34} {'persistent':11} {'alive':6} "
          f"{'bitwise':14} estimate")
    for name, v in verdicts.items():
        print(f"{name:20} {v['crash']:6} {v['peak']:34} {v['persistent']:11} {v['alive']:6} "
              f"{v['bitwise']:14} {v.get('estimate', '-')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="pattern names")
    parser.add_argument("--steps", type=int, default=3, help="at least 2")
    parser.add_argument("--backends", nargs="*", default=["events", "dispatch"])
    parser.add_argument("--estimate", action="store_true",
                        help="also memprof.estimate each pattern against the real run")
    parser.add_argument("--advice", action="store_true",
                        help="instead: every advisor row against its simulation, per pattern")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = [p for p in PATTERNS if not args.only or p.name in args.only]
    if args.advice:
        for pattern in chosen:
            if pattern.needs and importlib.util.find_spec(pattern.needs) is None:
                print(f"{pattern.name:20} skipped: needs {pattern.needs}")
                continue
            print_advice(pattern, args.steps)
            sys.stdout.flush()
        return
    header = (f"{'pattern':20} {'backend':8} {'crash':6} {'peak':>10} {'err%':>8} "
              f"{'persistent':>10} {'hand':>10} {'bitwise':7} {'freed':18} {'hooks':5} {'s':>5} "
              f"{'mode%':>8}")
    print(header)
    verdicts: dict[str, dict[str, str]] = {}
    for pattern in chosen:
        if pattern.needs and importlib.util.find_spec(pattern.needs) is None:
            print(f"{pattern.name:20} skipped: needs {pattern.needs}")
            continue
        rows = check(pattern, args.steps, args.backends, estimates=args.estimate)
        verdicts[pattern.name] = target_verdicts(rows)
        for r in rows:
            if r["crash"] != "no":
                print(f"{r['pattern']:20} {r['backend']:8} CRASH  {r['crash']}")
                continue
            print(f"{r['pattern']:20} {r['backend']:8} {'no':6} {r['peak']:>10} "
                  f"{r['peak_err_pct']:>+8.3f} {r['persistent']:>10} {r['hand']:>10} "
                  f"{'yes' if r['bitwise'] else 'NO':7} {r['freed']:18} "
                  f"{'LEFT' if r['hooks_left'] else 'none':5} {r['seconds']:>5.1f} "
                  + (f"{r['mode_pct']:>+8.3f}" if "mode_pct" in r else ""))
            if "estimate" in r:
                print(f"{'':29}estimate vs real run: {_estimate_text(r, rows)}")
            for w in r["warnings"]:
                print(f"{'':29}warning: {w[:150]}")
        sys.stdout.flush()
    print_targets(verdicts)


if __name__ == "__main__":
    main()
