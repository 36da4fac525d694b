"""memprof quick start: profile a small Transformer language model's training step, ask the
advisor what would lower its peak, and write the HTML report.

    python examples/quickstart.py [--steps 2] [--batch 4] [--seq 32] [--gpu T4]
                                  [--output reports/quickstart.json] [--force]

The model is the one from the memory-saving design articles memprof grew from: a stack of
``nn.TransformerEncoderLayer`` (d_model 512, 8 heads, 6 layers) over a 32,000-token vocabulary.
It trains a few steps with AdamW on the CPU under ``memprof.profile``, then prints the peak and
what held it, whether the step would fit the ``--gpu`` and the top recommendations with their
predicted savings, and writes the profile (``--output``) and its HTML report next to it (same
name, ``.html``). Existing files are never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import memprof

#: Recommendations printed (``memprof advise`` shows them all).
TOP = 5


class TinyLM(nn.Module):
    """Token embedding, a Transformer encoder stack, and a language-model head."""

    def __init__(self, vocab: int = 32000, d_model: int = 512, heads: int = 8,
                 layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps profiled")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--gpu", default="T4",
                        help='the GPU to fit the step on: "T4", "RTX 4090", "A100 40GB", or a '
                        'size such as 24GiB')
    parser.add_argument("--output", default="reports/quickstart.json", type=Path,
                        help="the profile JSON; the HTML report goes next to it")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    args = parser.parse_args()

    profile_path = args.output
    report_path = profile_path.with_suffix(".html")
    # Checked before the (slow) run, as memprof run does: never replace a file silently.
    for path in (profile_path, report_path):
        if path.exists() and not args.force:
            print(f"quickstart: error: {path} already exists: add --force to replace it, or "
                  "choose another --output", file=sys.stderr)
            return 2
    started = time.perf_counter()

    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    print(f"memprof quick start: a 6-layer Transformer LM ("
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), AdamW, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} training steps on the CPU\n")

    # 1. Profile: wrap the training loop; prof.step() ends a step.
    with memprof.profile(model, optimizer) as prof:
        for _ in range(args.steps):
            tokens = torch.randint(0, 32000, (args.batch, args.seq + 1))
            # the logits go out of scope with the loss: a loop that keeps them in a variable
            # holds them through the optimizer step too
            loss = loss_fn(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prof.step()
    profile = prof.profile
    print("1. Where the memory goes")
    print(_indent(profile.summary(top=6)))

    # 2. Advise for the GPU you would train on. The model is at hand, so each change is
    #    predicted by a fake run: applied to a copy on fake tensors (nothing allocated) and run.
    workload = memprof.Workload(model, optimizer, (tokens[:, :-1], tokens[:, 1:]),
                                step_fn=lambda m, batch: loss_fn(m(batch[0]).flatten(0, 1),
                                                                 batch[1].flatten()))
    predicting = time.perf_counter()
    advice = memprof.advise(profile, budget=args.gpu, fake_model=workload)
    print(f"\n2. What to change (each change predicted by a fake run of the model, "
          f"{time.perf_counter() - predicting:.0f} s; `memprof advise --simulate` measures them)")
    print(_indent(_advice_text(advice.to_dict(), profile)))

    # 3. Save the profile, with its advice, and the one-file HTML report.
    profile.advice = advice.to_dict()
    profile.save(profile_path, overwrite=args.force)
    profile.report(report_path, overwrite=args.force)
    print(f"\n3. Report: {report_path}  (open it in a browser: one offline file)")
    print(f"   Profile: {profile_path}  ({time.perf_counter() - started:.0f} s)")
    print("\nNext:")
    steps = [
        (f"memprof advise {profile_path} --gpu {shlex.quote(args.gpu)} --all",
         "every recommendation, with its caveats"),
        (f'memprof advise {profile_path} --gpu "A100 40GB"', "the same step on another GPU"),
        ("memprof run examples/train_mlp.py --steps 5", "profile a script of yours, unchanged"),
        ("memprof advise --simulate examples/train_mlp.py", "measure each change on a script"),
    ]
    width = max(len(command) for command, _ in steps)
    for command, what in steps:
        print(f"  {command:<{width}}  # {what}")
    return 0


def _advice_text(data: dict[str, Any], profile: memprof.Profile) -> str:
    """Whether the step fits, the one recommendation, then the top rows with their savings,
    as ``memprof advise`` and the report say them."""
    from memprof.report import advice_view

    lines = []
    fits = advice_view.fit(data)
    if fits is not None:
        lines.append(fits.text)
    elif isinstance(data.get("plan"), dict):
        lines.append(f"On this GPU: {data['plan'].get('explanation', '')}.")
    recommendation = advice_view.recommend(data, profile.oom)
    if recommendation is not None:
        lead = "To save more" if fits is not None else "Recommended"
        lines.append(f"{lead}: {recommendation.text}.")
    ordered = [r for r in advice_view.display_order(advice_view.rows(data))
               if advice_view.is_applicable(r) and advice_view.saves_memory(r)]
    if ordered:
        lines.append(f"Top {min(TOP, len(ordered))} of {len(ordered)} changes that save memory, "
                     "cheapest to the training first:")
        for r in ordered[:TOP]:
            saved = memprof.format_bytes(r["predicted_saving_bytes"])
            lines.append(f"  {advice_view.describe(r)}: saves {saved} "
                         f"({r.get('cost') or 'cost unknown'})")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join(f"   {line}" if line else line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
