"""The context an in-context adversary gives each question (kind incontext): passages retrieved
by BM25 (bm25s) from its corpus, cut into passages of a few sentences, and solved examples of a
disjoint task; put before the question the task asks, so lm-eval scores the same choices after a
longer context."""

from __future__ import annotations

import logging
import re

import numpy as np

from attack.config import DataConfig
from attack.errors import UserError


def passages(path: str, text_field: str, words: int, questions: list[str] = ()) -> tuple[list[str], int]:
    """The corpus's documents cut into passages of at most `words` words, at sentence ends where
    a sentence fits, with every verbatim occurrence of one of `questions` (the evaluated ones)
    cut out: a passage may carry the knowledge, never the test question itself. Returns the
    passages and how many occurrences were cut."""
    from attack.documents import load_documents

    strip = QuestionStripper(questions)
    out = []
    for doc in load_documents(DataConfig(path=path, text_field=text_field)):
        current: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", doc.strip()):
            tokens = sentence.split()
            if current and len(current) + len(tokens) > words:
                out.append(" ".join(current))
                current = []
            current += tokens
            while len(current) > words:
                out.append(" ".join(current[:words]))
                current = current[words:]
        if current:
            out.append(" ".join(current))
    out = [p for p in (strip(p) for p in out) if p]
    if not out:
        raise UserError(f"incontext corpus {path} holds no text to retrieve from")
    return out, strip.cut


class QuestionStripper:
    """Cuts verbatim questions (compared word by word, case and spacing aside) out of texts, in
    one pass over each text's words: questions are found by their first ANCHOR words."""

    ANCHOR = 4
    MIN_CHARS = 24  # shorter questions are too generic to tell from ordinary text

    def __init__(self, questions):
        self.anchors: dict[tuple, list[list[str]]] = {}
        for q in questions:
            words = q.lower().split()
            if len(" ".join(words)) >= self.MIN_CHARS and len(words) >= self.ANCHOR:
                self.anchors.setdefault(tuple(words[:self.ANCHOR]), []).append(words)
        self.cut = 0

    def __call__(self, text: str) -> str:
        if not self.anchors:
            return text
        words, low = text.split(), text.lower().split()
        keep, i = [], 0
        while i < len(words):
            found = next((q for q in self.anchors.get(tuple(low[i:i + self.ANCHOR]), ()) if low[i:i + len(q)] == q), None)
            if found is None:
                keep.append(words[i])
                i += 1
            else:
                self.cut += 1
                i += len(found)
        return " ".join(keep)


class Retriever:
    """BM25 over a corpus's passages."""

    def __init__(self, texts: list[str]):
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)
        self.texts = texts
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self.vocab = self.index.vocab_dict

    def top(self, query: str, k: int) -> list[int]:
        """The k passages that score highest for `query` (ties: the earlier passage)."""
        words = [w for w in re.findall(r"\w+", query.lower()) if w in self.vocab]
        if not words:
            return list(range(min(k, len(self.texts))))
        scores = self.index.get_scores(words)
        return [int(i) for i in np.lexsort((np.arange(len(scores)), -scores))[:k]]


def gold_answer(task, doc) -> str | None:
    """The text of a multiple-choice question's gold answer (for "did the passages contain it"):
    the gold choice, or, where the choices are letters, the document's own list of choices."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
    if isinstance(target, str):
        target = choices.index(target) if target in choices else None
    if isinstance(target, list):
        target = target[0]
    if not isinstance(target, int) or not 0 <= target < len(choices):
        return None
    answer = str(choices[target]).strip()
    if len(answer) == 1 and isinstance(doc.get("choices"), list) and target < len(doc["choices"]):
        answer = str(doc["choices"][target]).strip()  # letter MCQA: the lettered choice's text
    return answer or None


def solved_example(task, doc) -> str:
    """A question of `task` with its gold answer, as lm-eval writes a few-shot example."""
    text = task.doc_to_text(doc)
    choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
    answer = choices[target] if isinstance(target, int) else target
    return f"{text}{task.config.target_delimiter}{answer}"


def with_context(task, prefix_of) -> None:
    """Every question of `task` asked after its context: `prefix_of(question text)` (text to put
    before it, or ""). The task's own prompt, choices and target are unchanged."""
    original = task.doc_to_text

    def doc_to_text(doc, *args, **kwargs):
        text = original(doc, *args, **kwargs)
        return prefix_of(text) + text if isinstance(text, str) else text

    task.doc_to_text = doc_to_text
