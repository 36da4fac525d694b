"""What every technique shares: the facts read from a Profile, a Change, and the peak model.

A prediction replays the profile's timeline. Each timeline sample is the bytes live per
category at one moment of the step (module boundaries, phase changes and the step's peak); a
:class:`Change` rewrites a sample (halve the activations, drop the gradients of frozen
layers, ...) and the predicted peak is the largest rewritten sample. So a technique that
shrinks a category which is small *at the peak* moves the peak elsewhere instead of claiming
the whole saving, and changes compose by applying their rewrites in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from memprof.categories import CATEGORIES
from memprof.profile import Profile

#: The 8 categories (bytes, float), "phase", "module", "after_backward" (the step's backward
#: has begun) and, for a moment inside a module between two timeline samples (which are taken
#: at module boundaries), "transient" and "excess": the bytes it adds to the module's sample.
Sample = dict[str, Any]

#: Module types whose saved activations autocast makes 16-bit, and whose weights it casts.
CONV_TYPES = frozenset({"Conv1d", "Conv2d", "Conv3d"})
MATMUL_TYPES = frozenset({"Linear", "Conv1D", "Bilinear"}) | CONV_TYPES
NORM_TYPES = frozenset(
    {"LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "GroupNorm", "LlamaRMSNorm"}
)


@dataclass
class Facts:
    """Numbers the techniques need, read once from a profile."""

    profile: Profile
    samples: list[Sample]
    peak_bytes: int
    parameter_bytes: int
    has_optimizer: bool
    optimizer_class: str | None
    optimizer_defaults: dict[str, Any]
    float_input_fraction: float
    modules: Any  # the modules() DataFrame

    @property
    def training(self) -> bool:
        return self.has_optimizer

    def module_rows(self) -> list[dict[str, Any]]:
        return list(self.modules.to_dict(orient="records"))


def weight_read_directly(rows: list[dict[str, Any]]) -> set[str]:
    """Modules whose forward never ran though their parent's did: the model reads their
    parameters directly (Mamba's mixer computes ``dt_proj.weight @ x``). A compiled model's
    modules, whose forwards no hook sees, all show no call and are not among them."""
    calls = {str(r["module"]): int(r.get("forward_calls", 1) or 0) for r in rows}
    parents = {str(r["module"]): r.get("parent") for r in rows}
    compiled = {str(r["module"]) for r in rows if r.get("type") == "OptimizedModule"}
    return {name for name, n in calls.items()
            if n == 0 and parents.get(name) is not None and str(parents[name]) not in compiled
            and calls.get(str(parents[name]), 0) > 0}


def model_tree(model: nn.Module) -> dict[str, list[str]]:
    """Each module's qualified name ("" for the root) -> its children's, in order."""
    return {name: [f"{name}.{child}".lstrip(".") for child, _ in m.named_children()]
            for name, m in model.named_modules()}


class ModuleNames(dict[str, nn.Module]):
    """A model's modules by qualified name, where a name a profile took through a compiled
    module (``torch.compile``'s wrapper names its model ``_orig_mod``) finds the same module of
    the plain model, and a plain name that of the compiled one: the profile and the workload
    the advisor is given need not both be compiled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, module in model.named_modules():
            self.setdefault(name, module)
        for name, module in model.named_modules():
            self.setdefault(source_name(name), module)

    def __missing__(self, name: str) -> nn.Module:
        plain = source_name(name)
        if plain == name:
            raise KeyError(name)
        return self[plain]


def names_in(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` (a profile's) as ``model`` names those modules (see :class:`ModuleNames`)."""
    table = ModuleNames(model)
    own = {id(module): name for name, module in model.named_modules()}
    return [own[id(table[name])] for name in names]


def source_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` steps of compiled wrappers (``_orig_mod.0`` -> ``0``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


#: Why quantizing the base is not a row for a model that already trains LoRA adapters.
ADAPTED_REASON = (
    "the model already trains peft LoRA adapters: its base layers are wrapped by peft, and "
    "memprof's int8/int4 layers replace plain Linear/Conv1D layers only (the qlora row puts "
    "the bases under the adapters in NF4); quantize the base before get_peft_model and "
    "profile that"
)


def lora_adapted(facts: Facts) -> bool:
    """Whether the profiled model carries peft LoRA adapters (modules named ``lora_A``)."""
    return any(str(r["module"]).rsplit(".", 1)[-1] == "lora_A" for r in facts.module_rows())


def adapted_bases(facts: Facts) -> list[str]:
    """The frozen base layers under the model's peft LoRA adapters: each ``base_layer`` (a
    Linear or transformers' Conv1D) whose peft layer holds a ``lora_A``."""
    rows = facts.module_rows()
    names = {str(r["module"]) for r in rows}
    return [str(r["module"]) for r in rows
            if str(r["module"]).endswith(".base_layer") and str(r["type"]) in {"Linear", "Conv1D"}
            and str(r["module"]).removesuffix("base_layer") + "lora_A" in names]


def sparse_gradients(facts: Facts) -> int:
    """How many trained tensors get sparse gradients (``nn.Embedding(sparse=True)``), as the
    profile's optimizers recorded; a profile from before that record: those SparseAdam trains
    (it takes sparse gradients only)."""
    total = 0
    for opt in facts.profile.optimizers:
        count = opt.get("sparse_gradients")
        if count is None and opt.get("class") == "SparseAdam":
            count = len(opt.get("parameter_shapes") or [None])
        total += int(count or 0)
    return total


def profile_tree(profile: Profile) -> dict[str, list[str]]:
    """The same tree, read from a profile's module table."""
    tree: dict[str, list[str]] = {m.name: [] for m in profile.modules_stats}
    for m in profile.modules_stats:
        if m.parent is not None and m.parent in tree:
            tree[m.parent].append(m.name)
    return tree


def read_facts(profile: Profile) -> Facts:
    """The facts of ``profile``; raises ValueError when it recorded no step."""
    peak = profile.peak()
    timeline = profile.timeline()
    samples: list[Sample] = []
    backward_steps: set[int] = set()
    step_peaks = {st.step: st.peak_bytes for st in profile.steps_stats}
    for row in timeline.to_dict(orient="records"):
        s: Sample = {c: float(row[c]) for c in CATEGORIES}
        s["phase"] = str(row["phase"])
        s["module"] = str(row["module"])
        step = int(row["step"])
        if s["phase"] == "backward":
            backward_steps.add(step)
        s["after_backward"] = step in backward_steps
        if step_peaks.get(step) == round(_total(s)):  # the timeline keeps each step's peak
            s["transient"] = True
            step_peaks.pop(step)
        samples.append(s)
    top: Sample = {c: float(peak.by_category.get(c, 0)) for c in CATEGORIES}
    top["phase"] = peak.phase
    top["module"] = peak.module
    top["transient"] = True
    samples.append(top)
    entries = _entries(samples)
    for largest in entries.values():
        largest["entry"] = True  # stands for the inside of its module (see cpu_kernels)
    for s in samples:
        if s.get("transient"):
            entry = entries.get((s["module"], s["phase"]))
            s["excess"] = max(0.0, _total(s) - _total(entry)) if entry is not None else 0.0
    samples.extend(_transient_samples(profile, entries))
    # between the forward and the backward the activations are live; after it they are not
    top["after_backward"] = peak.phase in ("backward", "optimizer") or (
        peak.phase == "other" and not top["activation"]
    )
    opt = profile.optimizers[0] if profile.optimizers else None
    frame = profile.modules()
    params = int(peak.by_category.get("parameter", 0))
    if opt is not None:
        params = int(opt.get("parameter_bytes", params)) or params
    inputs = profile.meta.get("inputs") or []
    total = sum(_nbytes(i) for i in inputs)
    floats = sum(_nbytes(i) for i in inputs if "float" in str(i.get("dtype", "")))
    return Facts(
        profile=profile,
        samples=samples,
        peak_bytes=int(peak.total_bytes),
        parameter_bytes=params,
        has_optimizer=opt is not None,
        optimizer_class=str(opt["class"]) if opt is not None else None,
        optimizer_defaults=dict(opt.get("defaults", {})) if opt is not None else {},
        float_input_fraction=floats / total if total else 0.0,
        modules=frame,
    )


def backward_order(facts: Facts) -> list[str]:
    """Modules in the order their backward starts (each once), from the first profiled step
    that ran a backward."""
    order: list[str] = []
    timeline = facts.profile.timeline()
    backward = timeline[timeline["phase"] == "backward"]
    if len(backward):
        first = backward[backward["step"] == backward["step"].iloc[0]]
        for module in first["module"]:
            if str(module) not in order:
                order.append(str(module))
    return order


def gradients_before(facts: Facts, modules: set[str]) -> dict[str, float]:
    """For each module in backward order: the gradient bytes that ``modules`` (by their own
    parameters) have produced by the time its backward starts."""
    own = {str(r["module"]): float(r["gradient"]) for r in facts.module_rows()}
    done, out = 0.0, {}
    for module in backward_order(facts):
        out[module] = done
        if module in modules:
            done += own.get(module, 0.0)
    return out


def _entries(samples: list[Sample]) -> dict[tuple[str, str], Sample]:
    """Per (module, phase): its largest boundary sample (not a moment inside it)."""
    best: dict[tuple[str, str], Sample] = {}
    for s in samples:
        key = (s["module"], s["phase"])
        if not s.get("transient") and (key not in best or _total(s) > _total(best[key])):
            best[key] = s
    return best


def _transient_samples(
    profile: Profile, entries: dict[tuple[str, str], Sample]
) -> list[Sample]:
    """Samples for the transients inside modules, which the timeline (taken at module
    boundaries) misses: each module's ``peak_forward``/``peak_backward`` is the most bytes live
    while it ran; the excess over its largest boundary sample is charged to ``temporary``."""
    out = []
    for m in profile.modules_stats:
        for phase, peak in (("forward", m.peak_forward), ("backward", m.peak_backward)):
            seen = entries.get((m.name, phase))
            if seen is None or peak <= _total(seen):
                continue
            extra = dict(seen)
            extra["temporary"] = seen["temporary"] + (peak - _total(seen))
            extra["transient"] = True
            extra["excess"] = peak - _total(seen)
            out.append(extra)
    return out


def _total(s: Sample) -> float:
    return float(sum(s[c] for c in CATEGORIES))


def _nbytes(info: dict[str, Any]) -> int:
    n = 1
    for d in info.get("shape", []):
        n *= int(d)
    dtype = str(info.get("dtype", "float32"))
    size = (
        8
        if "64" in dtype
        else 2
        if "16" in dtype
        else 1
        if ("8" in dtype or "bool" in dtype)
        else 4
    )
    return n * size


Transform = Callable[[Sample], Sample]


@dataclass
class Change:
    """One technique with its options: how it rewrites the profile, and how to apply it.

    ``quality_cost`` and ``speed_cost`` rank changes in the planner (0 = lossless/free; rough
    prior, replaced by measurements once simulated). ``apply`` receives the simulation state
    (see :mod:`memprof.advisor.workload`); None means it cannot be simulated here.
    """

    technique: str
    options: dict[str, Any]
    how: str
    transform: Transform | None = None
    apply: Callable[[Any], None] | None = None
    caveats: list[str] = field(default_factory=list)
    applicable: bool = True
    reason: str = ""
    quality_cost: float = 0.0
    speed_cost: float = 0.0
    training_only: bool = False
    group: str = ""  # changes of one group are alternatives (the planner picks at most one)
    predicted_peak: int | None = None  # set when the peak is not a timeline rewrite
    #: For changes that act on reserved memory only (allocator options): the replay's
    #: ``{"baseline": bytes, "predicted": bytes}``; the row's saving is then in reserved bytes.
    reserved: dict[str, int] | None = None
    #: The peak replayed from the profile's operator trace under the change
    #: (:mod:`memprof.advisor.trace_replay`), when the profile carries one.
    trace_peak: int | None = None
    #: Why an applicable change is never simulated (its row's ``not_simulated``), "" otherwise.
    not_simulated: str = ""
    #: Given the workload, whether the changed step is the unchanged one tensor for tensor
    #: (same shapes, dtypes, storages and code: zeros stored densely), so that its fake run
    #: would be the unchanged one's and its peak is taken from that run (advisor.fake_predict);
    #: None where it never is.
    unchanged_step: Callable[[Any], bool] | None = None


def predict_peak(facts: Facts, transforms: list[Transform]) -> int:
    """The largest sample after applying ``transforms`` in order."""
    best = 0.0
    for sample in facts.samples:
        s = dict(sample)
        for t in transforms:
            s = t(s)
        best = max(best, sum(max(0.0, float(s[c])) for c in CATEGORIES))
    return round(best)


def scaled(**factors: float) -> Transform:
    """A rewrite that multiplies categories by constant factors."""

    def transform(s: Sample) -> Sample:
        out = dict(s)
        for c, f in factors.items():
            out[c] = out[c] * f
        return out

    return transform


def not_applicable(
    technique: str, options: dict[str, Any], reason: str, *, how: str = "", group: str = ""
) -> Change:
    return Change(
        technique, options, how or reason, applicable=False, reason=reason, group=group or technique
    )


TRAINING_ONLY_REASON = (
    "the profile has no optimizer (inference or frozen model): there are no "
    "gradients or optimizer states for this training technique to change"
)
