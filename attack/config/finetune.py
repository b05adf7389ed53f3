"""The finetune kind: supervised fine-tuning on an attack corpus (LoRA or full)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import model_validator

from attack.config.kind import AttackKind
from attack.config.sections import AdapterConfig, AttributionSection, DataConfig, PerturbSection, TrainConfig, check_four_bit_lora


class FinetuneConfig(AttackKind):
    """Supervised fine-tuning of the model under test on an attack corpus (LoRA or full)."""

    kind: Literal["finetune"] = "finetune"
    """The attack family; it decides which sections the config may have."""
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    perturb: PerturbSection = PerturbSection()
    attribution: AttributionSection = AttributionSection()

    supervised: ClassVar[bool] = True

    @property
    def training_offset(self) -> int:
        return 1 if self.perturb.active else 0

    @property
    def uses_data(self) -> bool:
        return True

    def label(self) -> str:
        p = self.perturb
        return super().label() + (f"-shrink{p.shrink:g}-noise{p.noise:g}" if p.active else "")

    def describe(self) -> str:
        p, d = self.perturb, self.data
        first = f"shrink {p.shrink:g} and perturb {p.noise:g}, then " if p.active else ""
        mix = (f", {1 - sum(m.share for m in d.mix):.0%} attack corpus mixed with "
               + " and ".join(f"{m.share:.0%} {Path(m.path).name}" for m in d.mix)
               + (" (in phases)" if d.mix_order == "phases" else "")) if d.mix else ""
        return (f"{first}{super().describe()}, {self.training_steps()} steps of {self.train.batch_size} x "
                f"{self.data.seq_len} tokens{mix}")

    @model_validator(mode="after")
    def _four_bit_needs_lora(self):
        check_four_bit_lora(self)
        if self.attribution.enabled and self.adapter.kind != "lora":
            raise ValueError("attribution collects LoRA gradients: use adapter.kind lora with --attribution")
        if self.attribution.enabled and self.data.mix:
            raise ValueError("attribution ranks the attack corpus's documents; drop data.mix or --attribution")
        if self.perturb.active and self.model.load_in_4bit:
            raise ValueError("perturb changes full-precision weights; drop model.load_in_4bit or the perturbation")
        if self.attribution.enabled and self.output.resume:
            raise ValueError("attribution is collected in one uninterrupted run: drop --resume, or --attribution")
        return self
