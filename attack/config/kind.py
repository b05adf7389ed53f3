"""What every kind's config has and the questions every kind answers (does it read an attack
corpus, how many optimizer steps, where its curve starts, its label), so the sweep, the report and
the other commands ask the config instead of comparing kind names."""

from __future__ import annotations

from typing import ClassVar

from attack.config.sections import EvalConfig, LoggingConfig, ModelConfig, OutputConfig, Section
from attack.errors import UserError


class AttackKind(Section):
    """What every kind's config has and the questions every kind answers. Subclasses set `kind`
    (a Literal of their own name) and override what differs."""

    kind: str = ""
    """The attack family; it decides which sections the config may have."""
    model: ModelConfig = ModelConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    logging: LoggingConfig = LoggingConfig()

    curve_offset: ClassVar[int] = 0
    """Curve step of the attack's training step 0 (1 after a one-shot edit: step 1 is the edited model)."""
    sections: ClassVar[tuple[str, ...]] = ()
    """The report sections that exist for this kind (beyond those every run gets)."""
    attacks: ClassVar[bool] = True
    """Changes the model or its input (every kind but evaluate, which only scores): a verdict counts
    the settings of such kinds."""
    supervised: ClassVar[bool] = False
    """Trains on an attack corpus with a language-modelling loss (what counterfactual reruns and
    what GRPO is set against at matched steps)."""

    @property
    def uses_data(self) -> bool:
        """Reads an attack corpus (data section)."""
        return False

    @classmethod
    def trains(cls) -> bool:
        """Has a train section (optimizer, batch, seed); a quantization draws and trains nothing."""
        return "train" in cls.model_fields

    @property
    def seed(self) -> int:
        """The seed of the data order, dropout and initialisation; 0 where nothing is drawn."""
        return self.train.seed if self.trains() else 0

    def training_steps(self) -> int:
        """Optimizer steps of the attack (0 for a one-shot edit): from the token budget when one is set."""
        if self.uses_data and self.data.token_budget is not None:
            return max(1, -(-self.data.token_budget // self.tokens_per_step()))
        return self.train.max_steps

    def tokens_per_step(self) -> int | None:
        """Training tokens of one optimizer step; None where they are generated (RL)."""
        return self.train.batch_size * self.data.seq_len if self.uses_data else None

    def eval_schedule(self) -> list[int]:
        """The training steps at which the attack is evaluated (step 0 and the last included)."""
        from eval_callbacks.schedule import linear_schedule, log_schedule

        steps = self.training_steps()
        if steps == 0:  # a one-shot edit: the curve's points are its own (steps 0 and 1)
            return [0]
        if self.eval.schedule == "log":
            return log_schedule(steps, self.eval.log_points)
        return linear_schedule(steps, self.eval.every)

    def curve_steps(self) -> list[int]:
        """Every step the recovery curve will have: step 0, the unmodified model, then the
        scheduled points on the curve's axis."""
        return sorted({0, *(s + self.training_offset for s in self.eval_schedule())})

    @property
    def training_offset(self) -> int:
        """Curve step of training step 0 in this config: the kind's curve_offset, or 1 where a
        one-shot change of the model (a perturbation) comes before the training."""
        return self.curve_offset

    def adapter_label(self) -> str:
        return "full" if self.adapter.kind == "full" else f"lora-r{self.adapter.rank}"

    def label(self) -> str:
        """A short name of the attack setting, for runs outside a sweep (a sweep names its own)."""
        optimizer = "" if self.train.optimizer == "adamw" else f"-{self.train.optimizer}"
        return f"{self.adapter_label()}{optimizer}-lr{self.train.lr:g}"

    def describe(self) -> str:
        """One line on what the attack does, for the terminal and a sweep's dry run."""
        a = self.adapter
        adapter = "full" if a.kind == "full" else f"LoRA r={a.rank}"
        layers = f" on layers {','.join(map(str, a.layers))}" if a.layers is not None else ""
        return f"{adapter}{layers}, {self.train.optimizer} lr {self.train.lr:g}"

    def input_files(self) -> dict[str, str]:
        """Local files the attack reads besides its model and corpus, {key: path}, checked before it runs."""
        return {}

    def check_required(self) -> None:
        """What the kind needs and no default can supply, with the flag that supplies it."""
        if self.uses_data and not self.data.path:
            raise UserError("no attack data given: pass --data <file, folder or hub id> or set data.path")
