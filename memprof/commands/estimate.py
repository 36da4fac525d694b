"""``memprof estimate``: the memory of a training step on a GPU you do not have.

The model runs under FakeTensorMode (see :mod:`memprof.estimate`): nothing is allocated, every
size is exact, and the per-layer profile comes out as if the step had run on CUDA. What is
modelled rather than measured (512-byte allocator blocks, the CUDA context) is printed.

``--json`` prints one object on stdout with the keys: ``model``, ``description``, ``mode``
(``training``/``inference``), ``optimizer``, ``dtype``, ``mixed_precision``, ``device``,
``batch_size``, ``seq_len``, ``finetune`` (with --lora/--qlora: ``method``, ``rank``,
``targets``, ``description``; else absent), ``steps``, ``context_len``, ``kv_cache_bytes``,
``elapsed_s``,
``num_parameters``, ``parameter_bytes``, ``peak_bytes`` (tensors at the peak),
``cuda_context_bytes`` (modelled), ``device_total_bytes`` (the two added; on cuda the
replay's reserved bytes plus the context), ``reserved_bytes``, ``fragmentation_bytes`` and
``largest_free_block_bytes`` (the caching-allocator replay), ``advice_elapsed_s`` (with
``--gpu``: the advisor's time, fake runs included), ``modelled`` (what
was modelled, as sentences), ``peak`` (``total_bytes``, ``step``, ``phase``, ``module``,
``by_category``), ``layers`` (the per-layer rows: ``module``, ``type``, ``parameter``,
``gradient``, ``optimizer_state``, ``activation``, ``peak_forward``, ``peak_backward``),
``fit`` (null, or ``gpu``, ``budget``, ``budget_bytes``, ``usable_bytes``, ``needed_bytes``,
``fits``, ``headroom_bytes``), ``advice`` (the advisor's JSON or null), ``profile`` (path
written or null), ``notes``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import click
import pandas as pd

from memprof.commands.common import (
    echo_json,
    examples,
    handle_errors,
    json_option,
    note,
    one_line,
    output_path,
    size,
    table,
    to_jsonable,
)
from memprof.errors import MemprofError

#: Per-layer rows shown in the text summary.
TOP_LAYERS = 12
_LAYER_COLUMNS = ("parameter_total", "gradient_total", "optimizer_state_total",
                  "activation_total", "peak_forward", "peak_backward")


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof estimate llama-2-7b --batch-size 1 --seq-len 512 --gpu A100-80GB",
        "memprof estimate gpt2-xl --dtype fp32 --optimizer sgd --json",
        "memprof estimate mistral-7b --inference --context-len 4096 --gpu L4",
        "memprof estimate path/to/config.json -o reports/mymodel-estimate.json",
        "memprof estimate mypkg.models:build_model --batch-size 8",
        "memprof estimate gpt2 --seq-len 1024 --gpu RTX-4090 --max-batch",
        "memprof estimate llama-2-7b --qlora 16 --gpu RTX-4090",
    ),
    short_help="Estimate a step's memory without the GPU (fake tensors).",
)
@click.argument("model", metavar="MODEL")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences (or images) per batch.")
@click.option("-s", "--seq-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per sequence (ignored for image models).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
              show_default=True, help="Dtype of weights and step (fp32 with --mixed-precision).")
@click.option("--mixed-precision", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Keep fp32 weights and optimizer state; compute under autocast to this dtype.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "adafactor", "none"]),
              default="adamw", show_default=True, help="Optimizer whose state is estimated.")
@click.option("--lora", "lora_rank", type=click.IntRange(min=1), default=None, metavar="RANK",
              help="Fine-tune with LoRA adapters of this rank (peft) on the attention and MLP "
                   "projections (every Linear but the head otherwise); the base frozen.")
@click.option("--qlora", "qlora_rank", type=click.IntRange(min=1), default=None, metavar="RANK",
              help="As --lora, with those layers' weights in NF4 (torchao), frozen.")
@click.option("--inference", is_flag=True,
              help="Estimate inference (no_grad, KV cache) instead of a training step.")
@click.option("--context-len", type=click.IntRange(min=2), default=None, metavar="N",
              help="With --inference: size of the KV cache in tokens [default: --seq-len + 1].")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Device to model: cuda adds 512-byte blocks and the CUDA context.")
@click.option("--gpu", default=None, metavar="NAME",
              help="Say whether it fits this GPU (see memprof.gpus) and plan what would.")
@click.option("--steps", type=click.IntRange(min=1), default=2, show_default=True,
              help="Steps to run (the second has the optimizer state).")
@click.option("--analytic", is_flag=True,
              help="With --gpu: predict the advice from the profile alone (fast) instead of "
                   "fake runs of the model.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Also write the full profile JSON here (for memprof report / advise).")
@click.option("-f", "--force", is_flag=True, help="Replace an existing --output file.")
@click.option("--max-batch", "largest", flag_value="batch", default=None,
              help="With --gpu: find the largest batch that fits by fake runs, and estimate it.")
@click.option("--max-seq-len", "largest", flag_value="sequence",
              help="With --gpu: find the longest sequence that fits (at --batch-size).")
@json_option
@handle_errors
def command(
    model: str,
    batch_size: int,
    seq_len: int,
    dtype: str,
    mixed_precision: str | None,
    optimizer: str,
    lora_rank: int | None,
    qlora_rank: int | None,
    inference: bool,
    context_len: int | None,
    device: str,
    gpu: str | None,
    steps: int,
    analytic: bool,
    output: Path | None,
    force: bool,
    largest: str | None,
    as_json: bool,
) -> None:
    """Estimate the GPU memory of one training (or inference) step of MODEL, without a GPU.

    MODEL is a built-in shape (gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-2-7b, llama-3-8b,
    mistral-7b, bert-base, vit-base), a transformers config.json (or its folder), or
    module:factory naming a function that returns an nn.Module (with make_batch(batch_size,
    seq_len) in the same module unless it is a transformers model).
    """
    from memprof.estimate import build_spec, estimate_step

    if output is not None:
        output_path(output, force=force, what="profile")
    if mixed_precision is not None and dtype != "fp32":
        dtype = "fp32"  # mixed precision means fp32 weights; --dtype's default is bf16
    spec = build_spec(model)
    if context_len is not None and not inference:
        raise _usage("--context-len applies to --inference only")
    setup = _finetune_setup(lora_rank, qlora_rank, inference)
    found = None
    if largest is not None:
        found, batch_size, seq_len = _largest(
            spec, largest, gpu, batch_size, seq_len, optimizer=optimizer, dtype=dtype,
            mixed_precision=mixed_precision, device=device, steps=steps, inference=inference,
            context_len=context_len, prepare=setup)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' config chatter is not the user's business
        step = estimate_step(
            spec, batch=lambda: spec.make_batch(batch_size, seq_len), optimizer=optimizer,
            dtype=dtype, mixed_precision=mixed_precision, device=device, gpu=gpu, steps=steps,
            inference=inference, context_len=context_len, prepare=setup,
        )
    profile = step.profile
    elapsed = time.perf_counter() - started
    info = profile.meta["estimate"]
    info.update(batch_size=batch_size, seq_len=seq_len, elapsed_s=round(elapsed, 3))
    if setup is not None:
        info["finetune"] = {"method": setup.method, "rank": setup.rank,
                            "targets": len(setup.targets), "description": setup.describe()}

    notes: list[str] = []
    advice = None
    if gpu is not None:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            advice, advice_note = _advise(profile, info, None if analytic else step)
        info["advice_elapsed_s"] = round(time.perf_counter() - started, 3)
        if advice_note:
            notes.append(advice_note)
        if advice is not None:
            profile.advice = to_jsonable(advice)
    written = None
    if output is not None:
        written = profile.save(output, overwrite=force)

    if as_json:
        result = _json_result(profile, info, advice, written, notes)
        if found is not None:
            result["largest"] = {"along": largest, **to_jsonable(found)}
        echo_json(result)
    else:
        if found is not None:
            click.echo(found.describe("batch" if largest == "batch" else "sequence length")
                       + f" ({size(found.limit_bytes)} usable); estimated below\n")
        click.echo(render(profile, info, advice=advice, written=written))
        for line in notes:
            note(line)


def _largest(spec: Any, along: str, gpu: str | None, batch_size: int, seq_len: int,
             **options: Any) -> tuple[Any, int, int]:
    """--max-batch / --max-seq-len: the largest size that fits ``gpu`` (bisected by fake runs,
    :mod:`memprof.advisor.max_batch`), and the batch size and length to estimate then."""
    from memprof.advisor.max_batch import largest_for_estimate

    if gpu is None:
        raise _usage(f"--max-{'batch' if along == 'batch' else 'seq-len'} needs --gpu "
                     "(a GPU name or a size such as 24GiB)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found, _profile = largest_for_estimate(spec, gpu=gpu, batch_size=batch_size,
                                               seq_len=seq_len, along=along, **options)
    if found.size == 0:
        raise _usage(f"{found.describe('batch' if along == 'batch' else 'sequence length')} "
                     f"on {gpu}")
    if along == "batch":
        return found, found.size, seq_len
    return found, batch_size, found.size


def _finetune_setup(lora_rank: int | None, qlora_rank: int | None, inference: bool) -> Any:
    """The model's fine-tuning set-up for --lora / --qlora (None without either)."""
    if lora_rank is None and qlora_rank is None:
        return None
    if lora_rank is not None and qlora_rank is not None:
        raise _usage("give --lora or --qlora, not both")
    if inference:
        raise _usage("--lora and --qlora estimate a training step: leave out --inference")
    from memprof.advisor.finetune import FinetuneSetup

    if qlora_rank is not None:
        return FinetuneSetup("qlora", qlora_rank)
    assert lora_rank is not None
    return FinetuneSetup("lora", lora_rank)


def _usage(message: str) -> MemprofError:
    from memprof.estimate import EstimateError

    return EstimateError(message)


def _advise(profile: Any, info: dict[str, Any], step: Any) -> tuple[Any, str | None]:
    """The advisor's rows and plan for the GPU's memory, predicted by fake runs of the model the
    estimate built (``step``: a training step; inference rows, and ``step=None``, stay
    analytic), or None and a note saying why there is none. The budget is the GPU's text, so
    the plan's usable bytes are the fit verdict's (memprof.gpus.budget_of, with this
    estimate's allocator replay)."""
    fit = info.get("fit")
    if fit is None:
        return None, None
    try:
        from memprof.advisor import Workload, advise
    except ImportError as exc:
        return None, f"no plan: the advisor (memprof.advisor) is not available ({one_line(exc)})"
    fake_model = None
    if step is not None and not step.inference and step.optimizer is not None:
        fake_model = Workload(model=step.model, optimizer=step.optimizer, batch=step.batch,
                              step_fn=step.loss)
    try:
        return advise(profile, budget=str(fit["gpu"]), fake_model=fake_model), None
    except MemprofError as exc:
        return None, f"no plan: {one_line(exc)}"
    except Exception as exc:  # the estimate stands without a plan
        return None, f"no plan: the advisor failed ({type(exc).__name__}: {one_line(exc)})"


# ------------------------------------------------------------------ output
def layer_frame(profile: Any) -> pd.DataFrame:
    """The per-layer rows: the children of the model's largest ``ModuleList``/``Sequential``
    (the transformer blocks), else the root's children, with what they hold and the most
    bytes live while each ran."""
    frame = profile.modules()
    if not len(frame):
        return frame
    containers = frame[frame["type"].isin(["ModuleList", "Sequential"])]
    rows = None
    if len(containers):
        counts = frame.groupby("parent").size()
        best = max(containers["module"], key=lambda name: counts.get(name, 0))
        if counts.get(best, 0) >= 2:
            rows = frame[frame["parent"] == best]
    if rows is None:
        rows = frame[frame["depth"] == 1]
    if not len(rows):
        rows = frame[frame["depth"] == 0]
    return rows[["module", "type", *_LAYER_COLUMNS]].reset_index(drop=True)


def render(profile: Any, info: dict[str, Any], *, advice: Any = None,
           written: Path | None = None, top: int = TOP_LAYERS) -> str:
    """The text summary: what was estimated, the peak by category, the per-layer table, what
    was modelled, and the fit verdict."""
    peak = profile.peak()
    name = info.get("model") or "model"
    shape = f"batch {info.get('batch_size', '?')} x {info.get('seq_len', '?')}"
    precision = (f"fp32 weights, {info['mixed_precision']} autocast"
                 if info.get("mixed_precision") else info["dtype"])
    what = "inference" if info["mode"] == "inference" else f"training, {info['optimizer']}"
    if info.get("finetune"):
        what += f" over {info['finetune']['description']}"
    lines = [
        f"{name}: {info.get('description') or ''} — {info['num_parameters'] / 1e9:.3f} B "
        f"parameters ({size(info['parameter_bytes'])})".replace(":  —", ":"),
        f"{what}, {precision}, {shape}, modelled on {info['device']} "
        f"(fake tensors: nothing was allocated)",
        "",
        peak.describe(),
        "",
    ]
    rows = [[cat, size(n)] for cat, n in peak.by_category.items() if n]
    rows.append(["tensors at the peak", size(peak.total_bytes)])
    if info.get("kv_cache_bytes"):
        rows.append(["  of which KV cache", size(info["kv_cache_bytes"])])
    if info.get("reserved_bytes") is not None:
        rows.append(["reserved (allocator replay)", size(info["reserved_bytes"])])
        rows.append(["  cached, no tensor in it", size(info["fragmentation_bytes"])])
    if info.get("cuda_context_bytes"):
        rows.append(["CUDA context (modelled)", size(info["cuda_context_bytes"])])
        rows.append(["device total", size(info["device_total_bytes"])])
    lines.append(table(["at the peak", "bytes"], rows, align="lr"))
    layers = layer_frame(profile)
    if len(layers):
        lines += ["", "per layer (largest values seen):"]
        shown = layers.head(top)
        lines.append(table(
            ["module", "type", "params", "grads", "optim", "activations", "peak fwd",
             "peak bwd"],
            [[r.module or "(root)", r.type, *(size(getattr(r, c)) for c in _LAYER_COLUMNS)]
             for r in shown.itertuples()],
        ))
        if len(layers) > top:
            lines.append(f"... {len(layers) - top} more (--json or -o for all)")
    lines += ["", "modelled, not measured:"]
    lines += [f"  - {m}" for m in info.get("modelled", [])]
    fit = info.get("fit")
    if fit is not None:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        lines += ["", f"{fit['budget']}: {verdict}: the tensors peak at "
                      f"{size(peak.total_bytes)} of {size(fit['usable_bytes'])} usable "
                      f"(after the context and the {fit.get('reserve', 'fragmentation')} "
                      "reserve), "
                      f"{size(abs(fit['headroom_bytes']))} "
                      f"{'to spare' if fit['fits'] else 'too much'}"]
    if advice is not None:
        lines += ["", _advice_text(advice)]
        if info.get("advice_elapsed_s") is not None:
            rows_by = sorted({str(r.get("predicted_by")) for r in getattr(advice, "rows", [])
                              if r.get("predicted_by")})
            lines.append(f"advice took {info['advice_elapsed_s']:.1f} s (rows predicted by: "
                         f"{', '.join(rows_by) or 'none'}; --analytic skips the fake runs)")
    if written is not None:
        lines += ["", f"profile written to {written} (memprof report {written})"]
    return "\n".join(lines)


def _advice_text(advice: Any, *, top: int = 3) -> str:
    summary = getattr(advice, "summary", None)
    if callable(summary):
        try:
            return str(summary(top=top))
        except TypeError:
            return str(summary())
    return str(advice)


def _json_result(profile: Any, info: dict[str, Any], advice: Any, written: Path | None,
                 notes: list[str]) -> dict[str, Any]:
    peak = profile.peak()
    result = dict(info)
    result["peak"] = {
        "total_bytes": peak.total_bytes,
        "step": peak.step,
        "phase": peak.phase,
        "module": peak.module,
        "by_category": peak.by_category,
    }
    layers = layer_frame(profile)
    result["layers"] = [
        {"module": r["module"], "type": r["type"],
         **{c.removesuffix("_total"): int(r[c]) for c in _LAYER_COLUMNS}}
        for _, r in layers.iterrows()
    ]
    result.setdefault("fit", None)
    result["advice"] = to_jsonable(advice) if advice is not None else None
    result["profile"] = str(written) if written is not None else None
    result["notes"] = notes
    return result
