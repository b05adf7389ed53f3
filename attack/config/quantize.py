"""The quantize kind: the weights stored in a lower precision, no training."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from attack.config.kind import AttackKind
from attack.config.sections import Section


class QuantizeSection(Section):
    method: Literal["nf4", "int8", "fp16", "bf16"] = "nf4"
    """nf4: 4-bit NormalFloat in blocks of 64 (QLoRA's storage); int8: row-wise absmax 8-bit
    (LLM.int8()'s weights); both round to nearest, every linear weight but the output head.
    fp16, bf16: the whole model cast to that precision (attack/quantization.py)."""
    save_weights: bool = True
    """Save the quantized model to final/ (dequantized weights, fp32 for nf4 and int8: a 7B
    model takes 28 GB), so it can be inspected or attacked further; false keeps the scores only."""


class QuantizeConfig(AttackKind):
    """Quantization: the model under test scored after its weights are stored in a lower
    precision. No training: step 1 of the curve is the quantized model, as an ablation's."""

    kind: Literal["quantize"] = "quantize"
    """The attack family; it decides which sections the config may have."""
    quantize: QuantizeSection = QuantizeSection()

    curve_offset: ClassVar[int] = 1

    def training_steps(self) -> int:
        return 0

    def label(self) -> str:
        return f"quantize-{self.quantize.method}"

    def describe(self) -> str:
        m = self.quantize.method
        if m in ("fp16", "bf16"):
            return f"the whole model cast to {m}, no training"
        return f"{m} quantization of the linear weights (round to nearest), no training"

    @model_validator(mode="after")
    def _full_weights(self):
        if self.model.load_in_4bit:
            raise ValueError("the quantize kind quantizes full-precision weights itself; drop model.load_in_4bit")
        return self
