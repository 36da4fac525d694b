"""What a change costs the training, for ranking advice as a practitioner would.

Six tiers, in the order a change should be considered:

- ``"no change to the maths"``: the same updates, computed with less memory held
  (``zero_grad(set_to_none=True)``, ``foreach=False``, checkpointing, gradient accumulation,
  activations or optimizer state offloaded to host memory);
- ``"small"``: rounding changes that practice accepts (autocast, bf16 weights with fp32
  master weights, 8-bit optimizer states);
- ``"changes the training"``: another optimizer, pure bf16 without master weights, pruning,
  a larger batch;
- ``"only adapters train"``: LoRA and QLoRA, the fine-tuner's first move when full training
  does not fit one GPU: the base model is frozen (QLoRA: in 4 bits) and only small adapters
  learn, which suits fine-tuning and not training from scratch;
- ``"freezes layers"``: weight-only quantization in training: the quantized Linear weights
  stop learning and no adapter learns in their place (a frozen base with nothing trained on
  it suits inference, not fine-tuning: LoRA/QLoRA come first);
- ``"needs more GPUs"``: ZeRO/FSDP sharding over several ranks (the same maths, but the
  hardware of N GPUs): after every single-GPU plan.
"""

from __future__ import annotations

from typing import Any

NO_CHANGE = "no change to the maths"
SMALL = "small"
CHANGES_TRAINING = "changes the training"
ADAPTERS = "only adapters train"
FROZEN = "freezes layers"
MORE_GPUS = "needs more GPUs"
#: The tiers in the order advice is taken.
TIERS = (NO_CHANGE, SMALL, CHANGES_TRAINING, ADAPTERS, FROZEN, MORE_GPUS)


def cost_of(technique: str, options: dict[str, Any] | None) -> str:
    """The tier of a change, from its technique and options (the advice rows' own keys)."""
    opts = options or {}
    target = str(opts.get("to", ""))
    if technique in ("checkpointing", "offload"):
        return NO_CHANGE
    if technique == "sharding":
        return MORE_GPUS if int(opts.get("ranks", 2) or 2) > 1 else NO_CHANGE
    if technique in ("lora", "qlora"):
        return ADAPTERS
    if technique == "quantization":  # weights (frozen in training), or 8-bit optimizer states
        return FROZEN if "weights" in opts else SMALL
    if technique == "batch":
        return NO_CHANGE if "accumulation" in opts else CHANGES_TRAINING
    if technique == "optimizer":
        if target.startswith("zero_grad") or "foreach=False" in target:
            return NO_CHANGE
        return SMALL if "8bit" in target else CHANGES_TRAINING
    if technique == "mixed_precision":
        if opts.get("mode") == "autocast" or opts.get("master_weights") is True:
            return SMALL
        return CHANGES_TRAINING
    return CHANGES_TRAINING  # pruning, quantization and anything new until classified


def rank(tier: str) -> int:
    return TIERS.index(tier) if tier in TIERS else len(TIERS)
