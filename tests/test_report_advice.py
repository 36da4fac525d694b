"""One recommendation everywhere, the fit verdict first, and an advisor table a person reads:
the report's headline and out-of-memory card, ``memprof run``'s text and ``memprof advise``'s
table, on a real profile with advice and a post-mortem shaped as the advisor writes them."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from report_inputs import MIB, fitting_advice, profile_of, row, rows_for, with_oom
from torch import nn

from memprof.commands.advise import render
from memprof.commands.run import recommendation_text
from memprof.profile import Profile
from memprof.report import advice_view, headline, render_report
from memprof.report.page import context

#: Key names of the advice file that must never reach a reader.
INTERNAL_KEYS = ("baseline_peak_bytes", "predicted_peak_bytes", "predicted_saving_bytes",
                 "measured_peak_bytes", "saving_pct", "usable_bytes", "version 1")


@pytest.fixture(scope="module")
def profile() -> Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 10))
    return profile_of(model, torch.randn(32, 64))


@pytest.fixture(scope="module")
def oom_profile(profile: Profile) -> Profile:
    return with_oom(profile)


def test_one_recommendation_in_headline_card_advisor_and_run_output(
    oom_profile: Profile, tmp_path: Path
) -> None:
    # GIVEN a post-mortem whose plan is 2 of 4 blocks, and advice whose best row is 4 of 4
    assert advice_view.best(oom_profile.advice)["options"]["blocks"] == "4 of 4 blocks"
    # WHEN the report and memprof run's text are made
    ctx = context(oom_profile)
    run_text = recommendation_text(oom_profile.advice, oom_profile, tmp_path / "x.json")
    html = render_report(oom_profile)
    # THEN each says the plan's change, and the other choice appears in none of those places
    said = "checkpointing (blocks=2 of 4 blocks) saves about 16.0 MiB (predicted)"
    card = dict(ctx["oom"].items)
    assert said in ctx["head"].sentence
    assert said in card["fix"]
    assert f"Recommended: {said}" in run_text
    assert "4 of 4 blocks" not in ctx["head"].sentence + card["fix"]
    assert "4 of 4 blocks" not in run_text.splitlines()[0]
    # the page's three places carry the same words
    assert html.count(said) == 3, html.count(said)


def test_oom_card_says_what_where_alive_capacity_and_fix(oom_profile: Profile) -> None:
    card = headline.oom_card(oom_profile, advice_view.recommend(oom_profile.advice,
                                                                 oom_profile.oom))
    assert card is not None
    items = dict(card.items)
    assert list(items) == ["asked for", "where", "alive", "capacity", "fix"]
    assert items["asked for"] == "24.0 MiB"
    assert items["where"] == "'h.2.mlp', forward, step 1"
    assert items["alive"] == "76.0 MiB: activations 60.0 MiB, parameters 10.0 MiB, " \
                             "optimizer state 6.0 MiB"
    assert items["capacity"].startswith("96.0 MiB (RLIMIT_AS (address space)); 92.0 MiB")
    assert all(len(text.split()) <= 25 for text in items.values())


def test_best_row_needs_no_more_gpus_when_a_single_one_can_save() -> None:
    # GIVEN rows where ZeRO-1 over 8 GPUs saves the most, in the cheapest tier
    advice = {"recommendations": rows_for(100 * MIB)}
    # THEN the best is what one GPU can do; sharding only when nothing else saves
    assert advice_view.best(advice)["technique"] == "checkpointing"
    only = {"recommendations": [rows_for(100 * MIB)[0]]}
    assert advice_view.best(only)["technique"] == "sharding"
    # a single-GPU change that saves nothing goes after every change that saves
    idle = row("mixed_precision", {"mode": "pure"}, -MIB, "small", 100 * MIB)
    order = [(r["technique"], r["options"].get("mode")) for r in
             advice_view.display_order([*advice["recommendations"], idle])]
    assert order == [("checkpointing", None), ("checkpointing", None),
                     ("mixed_precision", "autocast"), ("sharding", None),
                     ("mixed_precision", "pure"), ("optimizer", None)]


def test_a_step_that_fits_says_so_first_with_its_headroom_and_largest_batch() -> None:
    # GIVEN advice for a 100 MiB step on a GPU with 14 GiB usable, with a batch fit
    data = fitting_advice(100 * MIB, 14 << 30, largest=512)
    # WHEN memprof advise renders it
    lines = render(data, top=12).splitlines()
    # THEN the fit verdict comes right after the peak, then the single-GPU recommendation
    assert lines[1] == ("It fits on T4 (16.0 GiB): step peak 100.0 MiB of 14.0 GiB usable, "
                        "13.9 GiB headroom; the largest batch that still fits is about 512.")
    assert lines[2] == "to save more: checkpointing (blocks=4 of 4 blocks) saves about " \
                       "30.0 MiB (predicted)"
    table = lines[lines.index("") + 1:]
    first_rows = [line.split()[0] for line in table[2:5]]
    assert "sharding" not in first_rows
    # AND a budget with no batch fit says nothing of the batch
    plain = render(fitting_advice(100 * MIB, 14 << 30), top=12)
    assert "headroom." in plain and "largest batch" not in plain


def test_a_cut_table_says_how_many_rows_were_left_out_and_how_to_see_them() -> None:
    data = fitting_advice(100 * MIB, 14 << 30)
    cut = render(data, top=2)
    assert "... 2 more row(s) not shown (of 4): --all shows them all" in cut
    every = render(data, top=0)
    assert "not shown" not in every
    assert every.count("caveat of") == 4


def test_report_advisor_table_reads_as_a_person_writes(oom_profile: Profile) -> None:
    html = render_report(oom_profile)
    advisor = html[html.index('<section id="advisor">'):html.index('<section id="device">')]
    text = re.sub(r"<[^>]+>", " ", advisor).replace("\u00a0", " ")
    for key in INTERNAL_KEYS:
        assert key not in text, key
    assert "Details" not in text
    assert not re.search(r"\b[a-z]+_(bytes|pct)\b", text)
    assert "30.0 MiB (30%)" in text  # sizes in units, the share of the peak beside them
    assert "caveat of checkpointing" in text  # every caveat whole
    assert "how checkpointing was predicted" in text
    assert "the step already runs the per-tensor loop" in text  # why a row does not apply


@pytest.mark.slow
def test_advise_cli_all_shows_every_row(profile: Profile, tmp_path: Path) -> None:
    # GIVEN a saved real profile
    path = profile.save(tmp_path / "p.json")
    # WHEN memprof advise prints its table cut at 3 rows, and with --all
    def advise(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "memprof", "advise", str(path),
                               "--gpu", "T4", *extra], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout
    cut, every = advise("--top", "3"), advise("--all")
    data = json.loads(advise("--json"))
    applicable = sum(1 for r in data["recommendations"] if r["applicable"])
    # THEN the cut one names what it left out, the full one shows every applicable row
    assert applicable > 3
    assert f"{applicable - 3} more row(s) not shown (of {applicable})" in cut
    assert "not shown" not in every
    assert every.splitlines()[1].startswith("It fits on T4 (16.0 GiB)")


def test_when_nothing_fits_every_output_names_the_change_that_comes_closest(
    oom_profile: Profile, tmp_path: Path
) -> None:
    # GIVEN a post-mortem whose planner found no combination that fits 50 MiB
    plan = {"budget": "50.0 MiB", "usable_bytes": 50 * MIB, "baseline_peak_bytes": 100 * MIB,
            "fits": False, "changes": [], "predicted_peak_bytes": None,
            "explanation": "no combination of the techniques fits 50.0 MiB; the lowest single "
                           "prediction is sharding (stage=ZeRO-1, ranks=8)"}
    assert oom_profile.oom is not None
    profile = dataclasses.replace(oom_profile,
                                  oom=dataclasses.replace(oom_profile.oom, plan=plan))
    # WHEN the report and memprof run's text are made
    ctx = context(profile)
    run_text = recommendation_text(profile.advice, profile, tmp_path / "x.json")
    # THEN all say nothing fits and name the lowest predicted peak, as the planner does
    said = ("nothing memprof tries fits 50.0 MiB usable; the closest: sharding (stage=ZeRO-1, "
            "ranks=8) saves about 40.0 MiB (predicted), to a peak of 60.0 MiB")
    assert dict(ctx["oom"].items)["fix"] == said
    assert said in ctx["head"].sentence
    assert said in run_text.splitlines()[0]
