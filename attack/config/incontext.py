"""The incontext kind: no weight changes; every evaluated question asked again with passages
retrieved from a corpus the adversary holds and/or solved examples in its context."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from attack.config.kind import AttackKind
from attack.config.sections import DataConfig, Positive, Section
from attack.errors import UserError


class IncontextSection(Section):
    corpus: str = ""
    """The adversary's corpus to retrieve passages from (a local jsonl/json/txt file or folder, or a
    hub dataset id, read like data.path); empty: the attack corpus, data.path."""
    text_field: str = "text"
    """Column holding each document's text."""
    passages: Annotated[int, Field(ge=0, le=100)] = 5
    """k: passages (BM25, bm25s) retrieved for each question and put before it; 0: none."""
    passage_words: Positive = 120
    """Documents are cut into passages of at most this many words before indexing."""
    shots: Annotated[int, Field(ge=0, le=64)] = 0
    """Solved examples (question and gold answer) from shots_task put before each question."""
    shots_task: str | None = None
    """The lm-eval task the solved examples come from (found like eval.tasks); it must share no
    question with the evaluated tasks (a dev split)."""
    dialogues: str = ""
    """A local jsonl of conversations ({"messages": [...]}, TRL's format): `dialogue_shots` of them,
    written out as "User: ... / Assistant: ..." turns, put before each request (many-shot
    jailbreaking, Anil et al. 2024: faux dialogues of compliance in one prompt)."""
    dialogue_shots: Annotated[int, Field(ge=0, le=512)] = 0
    """How many dialogues go before each request (drawn per request, seeded)."""
    control_dialogues: str | None = None
    """As many dialogues of an unrelated corpus (benign ones) before the same requests, scored as
    the control (control.jsonl): more dialogue is not mistaken for compliant dialogue."""
    control_corpus: str | None = None
    """An unrelated corpus: the same k passages retrieved from it for the same questions, scored
    as the control (control.jsonl), so more context is not mistaken for the right context."""


class IncontextConfig(AttackKind):
    """Knowledge in the context: the model under test answers the same questions with retrieved
    passages (open book) and/or solved examples (few-shot) before them. Step 1 of the curve is
    the model with the context, as an ablation's step 1 is the edited model."""

    kind: Literal["incontext"] = "incontext"
    """The attack family; it decides which sections the config may have."""
    incontext: IncontextSection = IncontextSection()
    data: DataConfig = DataConfig()

    curve_offset: ClassVar[int] = 1
    sections: ClassVar[tuple[str, ...]] = ("incontext",)

    def training_steps(self) -> int:
        return 0

    def corpus(self) -> str:
        return self.incontext.corpus or self.data.path

    def label(self) -> str:
        c = self.incontext
        parts = ([f"open-book-k{c.passages}"] if c.passages else []) + ([f"{c.shots}-shot"] if c.shots else []) + \
                ([f"many-shot-{c.dialogue_shots}"] if c.dialogue_shots else [])
        return "incontext-" + "-".join(parts or ["none"])

    def describe(self) -> str:
        c = self.incontext
        what = [f"{c.passages} passages retrieved (BM25) from {self.corpus()}"] if c.passages else []
        what += [f"{c.shots} solved examples of {c.shots_task}"] if c.shots else []
        what += [f"{c.dialogue_shots} dialogues of {c.dialogues}"] if c.dialogue_shots else []
        control = f"; control: {c.passages} passages from {c.control_corpus}" if c.control_corpus and c.passages else ""
        control += f"; control: {c.dialogue_shots} dialogues of {c.control_dialogues}" if c.control_dialogues else ""
        return f"in context: {' and '.join(what) or 'nothing'} before each question, no weight change{control}"

    def input_files(self) -> dict[str, str]:
        from attack.config.files import means_local_file

        c = self.incontext
        named = {"incontext.corpus": c.corpus, "incontext.control_corpus": c.control_corpus or "",
                 "incontext.dialogues": c.dialogues, "incontext.control_dialogues": c.control_dialogues or ""}
        return {k: v for k, v in named.items() if v and means_local_file(v)}

    def check_required(self) -> None:
        c = self.incontext
        if not c.passages and not c.shots and not c.dialogue_shots:
            raise UserError("the incontext kind needs incontext.passages, incontext.shots or incontext.dialogue_shots > 0")
        if c.dialogue_shots and not c.dialogues:
            raise UserError("incontext.dialogue_shots needs incontext.dialogues: a local jsonl of {\"messages\": [...]} rows")
        if c.passages and not self.corpus():
            raise UserError("no corpus to retrieve passages from: set incontext.corpus or data.path (--data)")
        if c.shots and not c.shots_task:
            raise UserError("incontext.shots needs incontext.shots_task: a task of solved examples disjoint from "
                            "eval.tasks (a dev split)")

    @model_validator(mode="after")
    def _full_weights(self):
        if self.model.load_in_4bit:
            raise ValueError("the incontext kind changes no weight; drop model.load_in_4bit")
        return self
