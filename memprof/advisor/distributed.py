"""Sharding simulated with real ranks: N processes on this machine's CPU, talking over gloo.

A sharded change sets :attr:`SimState.shard`; :func:`run_ranks` then forks ``state.ranks``
processes (each with its own copy of the model, made by the fork), joins them in a gloo
process group, shards the copy and runs the same steps under memprof in every rank. Each rank
gets the whole batch, so the averaged gradients equal the unsharded run's and so do the
results: what changes is where the bytes live. The measured peak is the largest rank's.

- ZeRO-1: :class:`torch.distributed.optim.ZeroRedundancyOptimizer` around the optimizer class
  (each rank keeps the states of its share of the parameters, then broadcasts them).
- ZeRO-3 / FSDP: FSDP2's ``fully_shard`` on each unit of :func:`fsdp_units` and then the root.

Gradients are not all-reduced for ZeRO-1 (every rank computed the same ones), so the buckets
DDP would add are not measured. Linux only (the ranks are forked); each rank runs one thread.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memprof.advisor.core import model_tree
from memprof.errors import first_line

if TYPE_CHECKING:  # workload.run imports this module when a state is sharded
    from memprof.advisor.workload import Measurement, SimState, Workload

#: How long the ranks may take together before they are killed (a rank that died leaves the
#: others waiting in a collective until gloo's own timeout).
RANK_TIMEOUT_S = 300.0


def unavailable_reason() -> str | None:
    """Why ranks cannot be simulated here, or None."""
    if not sys.platform.startswith("linux"):
        return "simulating ranks forks processes: Linux only"
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return "this torch has no torch.distributed with gloo"
    if torch.__version__ >= "2.6":  # FSDP2 is public from 2.6: no import (seconds) to check
        return None
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


def fsdp_units(tree: dict[str, list[str]], type_of: Callable[[str], str],
               owns_parameters: Callable[[str], bool]) -> list[str]:
    """The modules ``fully_shard`` wraps before the root, innermost first: the items of every
    ``ModuleList`` (transformer blocks), else the root's children that hold parameters.
    ``tree`` maps each module name to its children's names ("" is the root)."""
    lists = [name for name in tree if type_of(name) == "ModuleList"]
    units = [k for name in lists for k in tree[name]] if lists else tree.get("", [])
    return sorted((k for k in units if owns_parameters(k)), key=lambda k: -k.count("."))


def shard_model(model: nn.Module) -> list[str]:
    """FSDP2 on ``model``: each unit, then the root; the units' names."""
    from torch.distributed.fsdp import fully_shard

    modules = dict(model.named_modules())
    units = fsdp_units(model_tree(model), lambda n: type(modules[n]).__name__,
                       lambda n: any(True for _ in modules[n].parameters()))
    for name in units:
        fully_shard(modules[name])
    fully_shard(model)
    return units


def _apply_sharding(state: SimState) -> None:
    """Shard ``state``'s copy as ``state.shard`` says, inside a rank."""
    if state.shard == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from memprof.advisor.workload import accepted_options

        cls = state.optimizer_class
        assert cls is not None  # sharding rows are training-only
        options = accepted_options(cls, state.defaults)

        def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **options)

        state.make_optimizer = make
        return
    names = {id(p): n for n, p in state.model.named_parameters()}
    shard_model(state.model)
    sharded = dict(state.model.named_parameters())  # fully_shard makes new (DTensor) ones
    for group in state.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


def run_ranks(workload: Workload, state: SimState, *,
              reference: Measurement | None) -> Measurement:
    """Run ``state`` (sharded as ``state.shard`` says) on ``state.ranks`` forked CPU ranks and
    return the measurement of the rank whose peak is largest."""
    from memprof.advisor.workload import Measurement
    from memprof.profile import load

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="memprof-ranks-") as tmp:
        folder = Path(tmp)
        ranks = [context.Process(target=_rank, args=(r, folder, workload, state, reference),
                                 daemon=True) for r in range(state.ranks)]
        for process in ranks:
            process.start()
        deadline = time.monotonic() + RANK_TIMEOUT_S
        for process in ranks:
            process.join(max(0.0, deadline - time.monotonic()))
        stuck = [p for p in ranks if p.is_alive()]
        for process in stuck:
            process.kill()
            process.join()
        errors = [(folder / f"rank{r}.error") for r in range(state.ranks)]
        failed = [e.read_text() for e in errors if e.exists()]
        if failed:
            raise RuntimeError(f"a rank failed: {failed[0]}")
        if stuck:
            raise RuntimeError(f"the {state.ranks} ranks did not finish in {RANK_TIMEOUT_S:.0f} s")
        results = [json.loads((folder / f"rank{r}.json").read_text())
                   for r in range(state.ranks)]
        worst = max(range(state.ranks), key=lambda r: results[r]["peak_bytes"])
        profile = load(folder / f"rank{worst}.profile.json")
    r = results[worst]
    return Measurement(r["peak_bytes"], r["step_time_s"], r["output_drift"], r["loss_drift"],
                       r["final_loss"], profile)


def _rank(rank: int, folder: Path, workload: Workload, state: SimState,
          reference: Measurement | None) -> None:
    """One rank, in a forked process: never returns (``os._exit``)."""
    import torch.distributed as dist

    from memprof.advisor.workload import run

    code = 1
    try:
        torch.set_num_threads(1)  # the ranks share the cores (and a forked OpenMP pool hangs)
        dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank,
                                world_size=state.ranks,
                                timeout=timedelta(seconds=RANK_TIMEOUT_S))
        try:
            _apply_sharding(state)
            m = run(workload, dataclasses.replace(state, shard=None), reference=reference)
        finally:
            dist.destroy_process_group()
        m.profile.save(folder / f"rank{rank}.profile.json")
        (folder / f"rank{rank}.json").write_text(json.dumps({
            "peak_bytes": m.peak_bytes, "step_time_s": m.step_time_s,
            "output_drift": m.output_drift, "loss_drift": m.loss_drift,
            "final_loss": m.final_loss,
        }))
        code = 0
    except BaseException as exc:  # reported by the parent, which has the terminal
        first = first_line(exc)
        (folder / f"rank{rank}.error").write_text(f"rank {rank}: {type(exc).__name__}: {first}")
    finally:
        os._exit(code)
