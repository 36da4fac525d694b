"""Fine-tuning set-ups made on a built model before it is estimated (``memprof estimate
--lora/--qlora``): LoRA adapters with peft on the advisor's targets, and for QLoRA those
targets' weights first in NF4 (torchao), exactly as the advisor's LoRA and QLoRA rows make them
(:mod:`memprof.advisor.lora`, :mod:`memprof.advisor.qlora`). The base is frozen; the optimizer
the estimate makes then trains the adapters alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from memprof.advisor import lora, qlora
from memprof.errors import EstimateError

METHODS = ("lora", "qlora")


@dataclass
class FinetuneSetup:
    """``prepare`` for :func:`memprof.estimate.estimate_step`: adapters of ``rank`` (on NF4
    weights for ``qlora``). After it ran, ``targets`` names the adapted layers and ``what``
    says how they were chosen."""

    method: str
    rank: int
    targets: list[str] = field(default_factory=list)
    what: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EstimateError(f"fine-tuning method {self.method!r}: use one of {METHODS}")
        needed = qlora.available() if self.method == "qlora" else lora.peft_available()
        if not needed:
            missing = "peft and torchao" if self.method == "qlora" else "peft"
            raise EstimateError(f"--{self.method} needs {missing}: "
                                "pip install 'memprof[finetune]'")

    def __call__(self, model: nn.Module) -> nn.Module:
        self.what, self.targets = lora.targets_in(lora.model_rows(model))
        if not self.targets:
            raise EstimateError(f"--{self.method}: the model has no Linear layer besides the "
                                "output head to adapt")
        if self.method == "qlora":
            qlora.quantize_layers(model, self.targets)
        return lora.apply_lora(model, self.rank, self.targets)

    def describe(self) -> str:
        """``LoRA rank 16 on 224 layers: attention and MLP projections (Llama)``."""
        base = ", NF4 base" if self.method == "qlora" else ""
        return (f"{'QLoRA' if self.method == 'qlora' else 'LoRA'} rank {self.rank}{base} on "
                f"{len(self.targets)} layers: {self.what}")

