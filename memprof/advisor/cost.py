"""What a change costs the training, for ranking advice as a practitioner would.

Three tiers, in the order a change should be considered:

- ``"no change to the maths"``: the same updates, computed with less memory held
  (``zero_grad(set_to_none=True)``, ``foreach=False``, checkpointing, gradient accumulation,
  ZeRO/FSDP sharding and CPU offload);
- ``"small"``: rounding changes that practice accepts (autocast, bf16 weights with fp32
  master weights, 8-bit optimizer states);
- ``"changes the training"``: another optimizer, pure bf16 without master weights, pruning,
  quantized (frozen) weights, a larger batch.
"""

from __future__ import annotations

from typing import Any

NO_CHANGE = "no change to the maths"
SMALL = "small"
CHANGES_TRAINING = "changes the training"
#: The tiers in the order advice is taken.
TIERS = (NO_CHANGE, SMALL, CHANGES_TRAINING)


def cost_of(technique: str, options: dict[str, Any] | None) -> str:
    """The tier of a change, from its technique and options (the advice rows' own keys)."""
    opts = options or {}
    target = str(opts.get("to", ""))
    if technique in ("checkpointing", "sharding"):
        return NO_CHANGE
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
