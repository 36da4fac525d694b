"""The checks that need a GPU, as one script for a session that has one lent (about 5 min).

On a machine with CUDA it runs, in order:

1. ``python -m pytest -m cuda -q`` (the CUDA tests);
2. per model, a real training step on ``cuda``, each in a fresh process per allocator setting
   (``PYTORCH_CUDA_ALLOC_CONF`` is read when CUDA starts): memprof's tracked peak against
   ``torch.cuda.max_memory_allocated()``, and the allocator replay's predicted reserved peak
   against ``torch.cuda.max_memory_reserved()``;
3. per model, ``memprof.estimate(..., device="cuda")`` (fake tensors) against the real run.

Every figure is printed as a ratio (memprof / PyTorch's own counter) and written with ``--json``.
Without CUDA it says so and exits with code 2 (nothing to check), so it is safe anywhere.

    python benchmarks/gpu_check.py [--json gpu_check.json] [--models mlp,gpt2] [--skip-pytest]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFS = ("", "expandable_segments:True")
MODELS = ("mlp", "cnn", "gpt2", "bert", "llama", "lstm")
DEADLINE_S = 8 * 60


def build(name: str) -> tuple[Callable[[], Any], Callable[[], Any], Callable[[Any], Any]]:
    """(model factory, batch factory on the CPU, loss of the model's output) for a model."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return (lambda: nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)),
                lambda: torch.randn(64, 1024), lambda out: out.float().pow(2).mean())
    if name == "cnn":
        def cnn() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        return cnn, lambda: torch.randn(16, 3, 64, 64), lambda out: out.float().mean()
    if name == "lstm":
        class LM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(2000, 256)
                self.rnn = nn.LSTM(256, 256, num_layers=2, batch_first=True)
                self.out = nn.Linear(256, 2000)
                self.out.weight = self.emb.weight  # tied

            def forward(self, ids: Any) -> Any:
                return self.out(self.rnn(self.emb(ids))[0])
        return (LM, lambda: torch.randint(0, 2000, (8, 64)),
                lambda out: out.float().logsumexp(-1).mean())
    import transformers as tf

    if name == "gpt2":
        config: Any = tf.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096,
                                    n_positions=256)
        make: Any = tf.GPT2LMHeadModel
    elif name == "bert":
        config = tf.BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                               intermediate_size=1024, vocab_size=4096)
        make = tf.BertForMaskedLM
    elif name == "llama":
        config = tf.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                                num_key_value_heads=2, intermediate_size=688, vocab_size=4096)
        make = tf.LlamaForCausalLM
    else:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")

    def batch() -> Any:
        ids = torch.randint(0, 4096, (4, 128))
        return {"input_ids": ids, "labels": ids.clone()}

    return (lambda: make(config), batch, lambda out: out.loss)


def one_run(name: str, device: str = "cuda") -> dict[str, Any]:
    """A real run of ``name`` in this process (its allocator options are already set); on
    ``cpu`` (a smoke test of this script) the CUDA counters are None."""
    import torch

    import memprof

    factory, batch_fn, loss_fn = build(name)
    cuda = device == "cuda"
    model = factory().to(device)
    opt = torch.optim.AdamW(model.parameters())

    def to_cuda(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v.to(device) for k, v in value.items()}
        return value.to(device)

    data = to_cuda(batch_fn())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before_allocated = torch.cuda.memory_allocated() if cuda else None
    before_reserved = torch.cuda.memory_reserved() if cuda else None
    with memprof.profile(model, opt) as prof:
        for _ in range(3):
            output = model(**data) if isinstance(data, dict) else model(data)
            loss_fn(output).backward()
            del output
            opt.step()
            opt.zero_grad()
            prof.step()
    if cuda:
        torch.cuda.synchronize()
    profile = prof.profile
    replay = (profile.allocator or {}).get("replay") or {}
    return {
        "model": name,
        "conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "tracked_peak_bytes": profile.peak().total_bytes,
        "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "allocated_before_profiling": before_allocated,
        "predicted_reserved_bytes": replay.get("reserved_peak_bytes"),
        "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "reserved_before_profiling": before_reserved,
        "backend": profile.meta.get("backend"),
    }


def estimate_run(name: str) -> dict[str, Any]:
    import memprof

    factory, batch_fn, loss_fn = build(name)
    started = time.perf_counter()
    profile = memprof.estimate(factory, batch=batch_fn, device="cuda", dtype="fp32",
                               loss_fn=loss_fn, steps=3)
    info = profile.meta["estimate"]
    return {"model": name, "estimated_peak_bytes": profile.peak().total_bytes,
            "estimated_reserved_bytes": info.get("reserved_bytes"),
            "seconds": round(time.perf_counter() - started, 2)}


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.4f}" if isinstance(a, int) and isinstance(b, int) and b else "n/a"


def child(args: argparse.Namespace) -> None:
    """``--child MODEL``: one real run, printed as one JSON line."""
    result = one_run(args.child)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing to check (run it where a GPU is lent)")
        raise SystemExit(2)
    started = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_pytest:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p",
                               "no:cacheprovider"], capture_output=True, text=True, timeout=240)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        out["pytest_cuda"] = {"returncode": proc.returncode, "summary": tail[0]}
        print(f"pytest -m cuda: exit {proc.returncode}: {tail[0]}")
    runs: list[dict[str, Any]] = []
    names = [m for m in args.models.split(",") if m]
    for name in names:
        for conf in CONFS:
            if time.perf_counter() - started > DEADLINE_S:
                print("gpu_check: out of time, stopping early")
                break
            env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
            proc = subprocess.run([sys.executable, __file__, "--child", name], env=env,
                                  capture_output=True, text=True, timeout=180)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                runs.append({"model": name, "conf": conf, "error": err})
                print(f"{name:6s} {conf or 'default':26s} FAILED: {err}")
                continue
            r = json.loads(line[len("RESULT "):])
            runs.append(r)
            print(f"{name:6s} {conf or 'default':26s} tracked/max_allocated "
                  f"{ratio(r['tracked_peak_bytes'], r['max_memory_allocated'])}  "
                  f"predicted/max_reserved "
                  f"{ratio(r['predicted_reserved_bytes'], r['max_memory_reserved'])}")
    out["runs"] = runs
    estimates = []
    for name in names:
        if time.perf_counter() - started > DEADLINE_S:
            break
        try:
            e = estimate_run(name)
        except Exception as exc:  # report and go on: one model must not hide the others
            estimates.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        real = next((r for r in runs if r.get("model") == name and not r.get("conf")
                     and "error" not in r), None)
        if real is not None:
            e["real_max_allocated"] = real["max_memory_allocated"]
            e["real_max_reserved"] = real["max_memory_reserved"]
            print(f"{name:6s} estimate/real allocated "
                  f"{ratio(e['estimated_peak_bytes'], real['max_memory_allocated'])}  "
                  f"estimated reserved/real "
                  f"{ratio(e['estimated_reserved_bytes'], real['max_memory_reserved'])}")
        estimates.append(e)
    out["estimates"] = estimates
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(f"gpu_check: {out['seconds']} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
