"""Profiles and advice that the report, advice-view, notebook and browser tests share: a model
whose module names are markup, and advice files written by hand (rows, a post-mortem, a fit)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

import memprof
from memprof.oom import OOMReport
from memprof.profile import Profile
from memprof.units import format_bytes

XSS = "<script>alert(1)</script>"


class Evil(nn.Module):
    """A model with a module whose name is markup."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(XSS, nn.Linear(16, 32))
        self.add_module("<img src=x onerror=alert(2)>", nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = torch.relu(child(x))
        return x


def profile_of(model: nn.Module, x: torch.Tensor, steps: int = 2) -> Profile:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with memprof.profile(model, optimizer) as prof:
        for _ in range(steps):
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prof.step()
    return prof.profile


MIB = 1 << 20


def row(
    technique: str, options: dict[str, Any], saving: int, cost: str, base: int, **extra: Any
) -> dict[str, Any]:
    """A recommendation row with the advisor's columns."""
    return {
        "technique": technique,
        "options": options,
        "applicable": True,
        "reason": None,
        "baseline_peak_bytes": base,
        "predicted_peak_bytes": base - saving,
        "predicted_saving_bytes": saving,
        "saving_pct": 100.0 * saving / base,
        "measured_peak_bytes": None,
        "error_pct": None,
        "quality": None,
        "step_time_ratio": None,
        "caveats": f"caveat of {technique}",
        "how": f"how {technique} was predicted",
        "cost": cost,
        **extra,
    }


def checkpoint(blocks: int) -> dict[str, Any]:
    return {"blocks": f"{blocks} of 4 blocks", "modules": [f"h.{i}" for i in range(blocks)]}


def rows_for(base: int) -> list[dict[str, Any]]:
    """Savings as shares of ``base``: sharding saves the most and checkpointing every block
    the most of the single-GPU changes: the advisor's ranking puts sharding first; the best
    single-GPU row is 4 of 4 blocks."""
    no_change = "no change to the maths"
    return [
        row("sharding", {"stage": "ZeRO-1", "ranks": 8}, base * 40 // 100, no_change, base),
        row("checkpointing", checkpoint(4), base * 30 // 100, no_change, base),
        row("checkpointing", checkpoint(2), base * 16 // 100, no_change, base),
        row(
            "mixed_precision",
            {"mode": "autocast", "dtype": "bf16"},
            base * 20 // 100,
            "small",
            base,
        ),
        {
            "technique": "optimizer",
            "options": {"to": "foreach=False"},
            "applicable": False,
            "reason": "the step already runs the per-tensor loop",
            "baseline_peak_bytes": base,
            "cost": no_change,
        },
    ]


def with_oom(profile: Profile) -> Profile:
    """The profile as a run that died of an out-of-memory error: its post-mortem's plan (the
    cheapest combination that fits the capacity) is checkpointing 2 of 4 blocks."""
    base = 100 * MIB
    plan = {
        "budget": "90.0 MiB",
        "usable_bytes": 90 * MIB,
        "baseline_peak_bytes": base,
        "fits": True,
        "changes": [{"technique": "checkpointing", "options": checkpoint(2)}],
        "predicted_peak_bytes": 84 * MIB,
        "combinations_tried": 5,
        "explanation": "checkpointing (blocks=2 of 4 blocks): predicted peak 84.0 MiB",
    }
    oom = OOMReport(
        error="RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried "
        "to allocate 25165824 bytes",
        requested_bytes=24 * MIB,
        module="h.2.mlp",
        phase="forward",
        step=1,
        live_bytes=76 * MIB,
        by_category={"activation": 60 * MIB, "parameter": 10 * MIB, "optimizer_state": 6 * MIB},
        by_module={"h.2.mlp": {"activation": 60 * MIB}},
        capacity_bytes=96 * MIB,
        capacity_source="RLIMIT_AS (address space)",
        budget_bytes=92 * MIB,
        plan=plan,
    )
    advice = {
        "version": 1,
        "baseline_peak_bytes": base,
        "simulated": False,
        "recommendations": rows_for(base),
        "plan": None,
    }
    return dataclasses.replace(profile, oom=oom, advice=advice)


def fitting_advice(base: int, usable: int, largest: int | None = None) -> dict[str, Any]:
    rows = rows_for(base)
    if largest is not None:
        rows.append(
            row(
                "batch",
                {"largest_batch_that_fits": largest},
                -3 * base,
                "changes the training",
                base,
            )
        )
    plan = {
        "budget": "T4 (16.0 GiB; 14.2 GiB usable by tensors); usable after the CUDA context",
        "usable_bytes": usable,
        "baseline_peak_bytes": base,
        "fits": True,
        "changes": [],
        "predicted_peak_bytes": base,
        "combinations_tried": 1,
        "explanation": f"fits as is: step peak {format_bytes(base)}",
    }
    return {
        "version": 1,
        "baseline_peak_bytes": base,
        "simulated": False,
        "recommendations": rows,
        "plan": plan,
        "usable_bytes": usable,
    }
