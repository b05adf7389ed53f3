"""The ablation kind: directional ablation by a weight edit, optionally fine-tuned afterwards."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from attack.config.kind import AttackKind
from attack.config.sections import AdapterConfig, DataConfig, Positive, Section, TrainConfig
from attack.errors import UserError


class AblationSection(Section):
    mode: Literal["knowledge", "refusal"] = "knowledge"
    """knowledge: contrast activations on target-domain text with general text (or with the
    reference model on the same text). refusal: harmful against harmless instructions through
    the chat template, read at the post-instruction tokens."""
    target_path: str = ""
    """Local jsonl/json/txt: target-domain text (knowledge) or harmful instructions (refusal)."""
    contrast_path: str = ""
    """Local jsonl/json/txt: general-domain text (knowledge) or harmless instructions (refusal).
    Its texts also measure the KL divergence of the edit."""
    text_field: str = "text"
    """Column holding the text in jsonl/json files."""
    reference_model: str | None = None
    """knowledge mode: the model before unlearning; the direction is then this model minus the
    reference on the target text."""
    fit_examples: Positive = 128
    """Texts of each side used for the means."""
    kl_examples: Positive = 32
    """Contrast texts (after the fitting ones) on which the KL bound is measured."""
    max_length: Positive = 128
    """Tokens per text."""
    dev_tasks: list[str] = []
    """lm-eval tasks (found like eval.tasks) that choose the direction: the candidate that
    restores the most accuracy on them wins. They must share no question with eval.tasks."""
    dev_prompts: Positive = 32
    """refusal mode without dev_tasks: harmful instructions (after the fitting ones) on which
    the candidate that lowers refusal the most wins."""
    refusal_tokens: list[str] = ["I", "As", "Sorry"]
    """refusal mode: first tokens of a refusal (their probability is the refusal score)."""
    kl_bound: Annotated[float, Field(gt=0)] = 0.1
    """Candidates whose edit moves next-token distributions on contrast text by more KL than
    this are discarded."""
    skip_last_layers: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """Fraction of the last layers whose directions are not candidates."""
    layers: Annotated[list[int], Field(min_length=1)] | None = None
    """Candidate layers; None: every layer outside skip_last_layers."""
    positions: Annotated[list[Annotated[int, Field(lt=0)]], Field(min_length=1)] | None = None
    """refusal mode: candidate post-instruction positions, counted back from the prompt's last
    token (-1: the last, where heretic reads its directions); None: every token the chat template
    writes after the instruction (the reference code's candidates)."""
    direction: Literal["selected", "random"] = "selected"
    """random: a random unit direction (seeded by train.seed) instead of the selected one: the
    control that shows the chosen direction matters."""
    strength: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Share of the component along the direction that is removed (1: all of it)."""
    doses: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Strengths at which the evaluation tasks are scored for the dose-response (dose.jsonl);
    empty: none (a control whose step 1 is all it needs)."""
    then_finetune: bool = False
    """Fine-tune the ablated model (adapter, data, train sections) as an ordinary fine-tuning
    attack; its curve continues from step 1, the ablated model."""

    @model_validator(mode="after")
    def _positions_in_refusal_mode(self):
        if self.positions is not None and self.mode != "refusal":
            raise ValueError("ablation.positions counts tokens after a refusal-mode instruction; knowledge mode "
                             "reads every token: drop it or set ablation.mode: refusal")
        return self


class AblationConfig(AttackKind):
    """Directional ablation: remove one direction from the residual stream by a weight edit,
    chosen on a dev split under a KL bound; optionally fine-tune afterwards."""

    kind: Literal["ablation"] = "ablation"
    """The attack family; it decides which sections the config may have."""
    ablation: AblationSection = AblationSection()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    curve_offset: ClassVar[int] = 1  # step 1 is the edited model; a fine-tune that follows counts on from it
    sections: ClassVar[tuple[str, ...]] = ("ablation",)

    @property
    def uses_data(self) -> bool:
        return self.ablation.then_finetune

    def training_steps(self) -> int:
        return super().training_steps() if self.ablation.then_finetune else 0

    def label(self) -> str:
        a = self.ablation
        then = f"-then-{super().label()}" if a.then_finetune else ""
        return f"ablation-{a.mode}-{a.direction}{then}"

    def describe(self) -> str:
        a = self.ablation
        what = f"directional ablation ({a.mode}, {a.direction} direction, strength {a.strength:g})"
        return what + (f", then {super().describe()}, {self.training_steps()} steps" if a.then_finetune else "")

    def input_files(self) -> dict[str, str]:
        return {"ablation.target_path": self.ablation.target_path, "ablation.contrast_path": self.ablation.contrast_path}

    def check_required(self) -> None:
        super().check_required()
        a = self.ablation
        for key in ("target_path", "contrast_path"):
            if not getattr(a, key):
                raise UserError(f"no ablation.{key} given: a local file of texts (--ablation-{key.replace('_', '-')})")
        if a.direction == "selected" and not a.dev_tasks and a.mode == "knowledge":
            raise UserError("no ablation.dev_tasks given: the tasks that choose the direction "
                            "(--ablation-dev-tasks), disjoint from eval.tasks")

    @model_validator(mode="after")
    def _full_weights(self):
        if self.model.load_in_4bit:
            raise ValueError("directional ablation edits the weights; it cannot load them in 4-bit")
        return self
