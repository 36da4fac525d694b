"""The vocabulary every part of memprof speaks: memory categories and step phases.

The names are part of the file format and of every table: never rename them.
"""

from __future__ import annotations

from typing import Final

PARAMETER: Final = "parameter"
BUFFER: Final = "buffer"
GRADIENT: Final = "gradient"
OPTIMIZER_STATE: Final = "optimizer_state"
ACTIVATION: Final = "activation"
TEMPORARY: Final = "temporary"
INPUT: Final = "input"
OTHER: Final = "other"

#: Every category, in the order tables and stacked charts use.
CATEGORIES: Final[tuple[str, ...]] = (
    PARAMETER,
    BUFFER,
    GRADIENT,
    OPTIMIZER_STATE,
    ACTIVATION,
    TEMPORARY,
    INPUT,
    OTHER,
)

CATEGORY_DESCRIPTIONS: Final[dict[str, str]] = {
    PARAMETER: "storages of the model's nn.Parameters (a shared storage counted once)",
    BUFFER: "registered buffers (BatchNorm running statistics, ...)",
    GRADIENT: ".grad of parameters",
    OPTIMIZER_STATE: "persistent optimizer.state tensors (exp_avg, exp_avg_sq, step, momentum)",
    ACTIVATION: "tensors autograd saved for backward, charged to the module that saved them",
    TEMPORARY: "every other allocation made inside the step (intermediates, optimizer scratch)",
    INPUT: "batch data and other tensors the step received from outside",
    OTHER: "live memory with no role above (a temporary that outlived its step, ...)",
}

FORWARD: Final = "forward"
BACKWARD: Final = "backward"
OPTIMIZER: Final = "optimizer"
OTHER_PHASE: Final = "other"

#: Every phase of a training step.
PHASES: Final[tuple[str, ...]] = (FORWARD, BACKWARD, OPTIMIZER, OTHER_PHASE)
