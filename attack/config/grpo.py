"""The grpo kind: reinforcement learning (TRL GRPO) with a reward on a split kept apart from the evaluation."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from attack.config.files import SHIPPED_REWARDS
from attack.config.kind import AttackKind
from attack.config.sections import AdapterConfig, Positive, Section, TrainConfig, check_four_bit_lora
from attack.errors import UserError

LOSS_TYPES = Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"]


class GrpoSection(Section):
    prompts_path: str = ""
    """Local jsonl/json/csv/parquet file of the reward split: one prompt and its gold answer per
    row. None of its prompts may be a question of an evaluated task."""
    prompt_field: str = "prompt"
    """Column holding the prompt (plain text, or a user turn of the chat template with model.chat_template)."""
    answer_field: str = "answer"
    """Column holding the gold answer: a letter (A-J) for multiple choice, else the answer text."""
    reward: str = "correct"
    """correct: 1 when the completion gives the gold answer first (the first letter, or the first
    line starting with the answer text), else 0. gold_prob: the probability the model gives the
    gold answer after the completion and answer_cue (dense). judge: a local judge model scores the
    completion with judge_rubric. complied: 1 when eval.judge says the completion complied with the
    request (the refusal attack, GRP-Obliteration's objective; prompts need no answer column). Or
    an importable module:function with TRL's reward signature."""
    answer_cue: str = " Answer:"
    """gold_prob: text put between the completion and the gold answer."""
    judge_model: str | None = None
    """judge: a local folder or hub id of a causal LM that scores completions (never a network API)."""
    judge_rubric: str = ("Question: {prompt}\nResponse: {completion}\nReference answer: {answer}\n"
                         "Rate from 0 to {max_score} how well the response answers the question. "
                         "Reply with the number only.")
    """judge: what the judge is asked; {prompt}, {completion}, {answer}, {max_score} are filled in
    (inside a user turn when the judge has a chat template)."""
    judge_reply_prefix: str = "Score:"
    """judge: the start of the judge's reply, written for it, so that a number comes next."""
    judge_max_score: Annotated[float, Field(gt=0)] = 10.0
    """judge: the top of the judge's scale; the reward is its score divided by this (0 to 1)."""
    judge_max_new_tokens: Positive = 8
    """judge: tokens the judge may generate; its first number in range is the score."""
    judge_cache: str = ".cache/judge"
    """judge: folder of the on-disk cache of scores, keyed by a hash of judge, rubric, prompt and
    completion (a rerun or a resumed run asks the judge nothing twice)."""
    num_generations: Annotated[int, Field(ge=2)] = 8
    """Completions per prompt (a GRPO group); train.batch_size counts completions."""
    max_completion_length: Positive = 64
    """Tokens generated per completion."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature of the completions."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling of the completions."""
    beta: Annotated[float, Field(ge=0)] = 0.0
    """KL weight to the model under test (0: no anchoring; with LoRA the reference is the base
    with the adapter off, so no second copy is loaded)."""
    loss_type: LOSS_TYPES = "dapo"
    """TRL's GRPO loss: dapo (token-level, TRL's default), grpo, dr_grpo, bnpo, cispo, sapo."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the reward spread of each group, of the batch, or not at all (Dr. GRPO)."""


class GrpoConfig(AttackKind):
    """Reinforcement learning: GRPO (TRL) with a reward on a split of questions kept apart from
    the evaluation; the recovery curve is read on the evaluated tasks as for fine-tuning."""

    kind: Literal["grpo"] = "grpo"
    """The attack family; it decides which sections the config may have."""
    grpo: GrpoSection = GrpoSection()
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()

    sections: ClassVar[tuple[str, ...]] = ("grpo",)

    def label(self) -> str:
        return f"grpo-{self.grpo.reward}-{super().label()}"

    def describe(self) -> str:
        g = self.grpo
        return (f"GRPO ({g.reward} reward, {g.loss_type} loss, beta {g.beta:g}), {super().describe()}, "
                f"{self.training_steps()} steps of {self.train.batch_size // g.num_generations} prompts x "
                f"{g.num_generations} completions")

    def input_files(self) -> dict[str, str]:
        return {"grpo.prompts_path": self.grpo.prompts_path}

    def check_required(self) -> None:
        g = self.grpo
        if not g.prompts_path:
            raise UserError("no grpo.prompts_path given: a local file of reward prompts and gold answers "
                            "(--grpo-prompts-path)")
        if g.reward == "judge" and not g.judge_model:
            raise UserError("grpo.reward judge needs grpo.judge_model: a local folder or hub id of the judge (--grpo-judge-model)")
        if g.reward not in SHIPPED_REWARDS and not re.fullmatch(r"[\w.]+:\w+", g.reward):
            raise UserError(f"grpo.reward must be correct, gold_prob, judge, complied or an importable module:function, "
                            f"got {g.reward!r}")


    @model_validator(mode="after")
    def _whole_groups(self):
        n, per_step = self.grpo.num_generations, self.train.batch_size
        if per_step % n:
            raise ValueError(f"train.batch_size ({per_step}, completions per step) must be a multiple of "
                             f"grpo.num_generations ({n}): every step scores whole groups")
        micro = self.train.micro_batch_size
        if micro is not None and micro % n and n % micro:
            raise ValueError(f"train.micro_batch_size ({micro}) must divide or be a multiple of grpo.num_generations ({n})")
        check_four_bit_lora(self)
        return self
