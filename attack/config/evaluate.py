"""The evaluate kind: no attack; the model scored as it is, once."""

from __future__ import annotations

from typing import ClassVar, Literal

from attack.config.kind import AttackKind


class EvaluateConfig(AttackKind):
    """No attack: the model scored as it is (step 0 alone). What a reference model needs in a
    sweep, whose report reads only its pre-attack score, and a baseline of any checkpoint on the
    tasks; it is not an attack setting, so a verdict does not count it among them."""

    kind: Literal["evaluate"] = "evaluate"
    """The attack family; it decides which sections the config may have."""

    attacks: ClassVar[bool] = False

    def training_steps(self) -> int:
        return 0

    def curve_steps(self) -> list[int]:
        return [0]

    def label(self) -> str:
        return "evaluate"

    def describe(self) -> str:
        return "no attack: the model scored as it is"
