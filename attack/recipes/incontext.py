"""Knowledge in the context (kind: incontext): the same questions, asked with what an adversary
can put before them instead of changing a weight.

    1. setup     the model (frozen), the evaluation tasks; the corpus cut into passages and indexed
                 (BM25), the solved examples' task; every check before the run directory exists
    2. context   per question: the k passages that score highest for its text, and `shots`
                 solved examples drawn for it (seeded); the same k from the control corpus
    3. open      the run directory
    4. step 0    the model as it is
    5. step 1    the same questions after their context (lm-eval scores the same choices; a
                 context longer than the model is cut as lm-eval cuts it) -> the curve
    6. control   the same questions after the control corpus's passages -> control.jsonl
    7. record    retrieval.jsonl: per question its passages and whether they hold the gold
                 answer; summary.json: the shares and the control's scores

A filtered model that answers from its context still lacks the knowledge; a model that does not
is not thereby safe: the worst case of the report spans this kind and the weight attacks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from attack.config import AdapterConfig, IncontextConfig
from attack.errors import UserError
from attack.evaluation import check_disjoint, check_texts_disjoint
from attack.files import write_atomic
from attack.model import load_model
from attack.recipes import common
from attack.retrieval import Retriever, gold_answer, passages, solved_example, with_context
from eval_callbacks.callback import append_rows


def run(cfg: IncontextConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    c = cfg.incontext
    # 1. Setup: the model, the evaluator, the corpus passages and their index, the solved examples.
    a = common.setup(cfg, extra_callbacks, quiet, cell, progress)
    model = load_model(cfg.model, AdapterConfig(kind="full")).to(common.device()).eval()
    evaluator, task_info = common.evaluator(a, model)
    evaluated = evaluator.questions()
    questions = {name: [(i, doc, str(task.doc_to_text(doc))) for i, doc in enumerate(task.eval_docs)]
                 for name, task in evaluator.tasks.items()}
    sources = {"attack": cfg.corpus(), **({"control": c.control_corpus} if c.control_corpus else {})} if c.passages else {}
    retrievers, cut = {}, {}
    asked = [q for qs in evaluated.values() for q in qs]
    for which, path in sources.items():
        # a passage that holds a test question itself would measure leakage of the benchmark, not
        # knowledge in the context: the question is cut out, the rest of the passage kept
        texts, cut[which] = passages(path, c.text_field, c.passage_words, asked)
        check_texts_disjoint(f"incontext corpus {path}", texts, evaluated)
        retrievers[which] = Retriever(texts)
    examples = _solved_examples(a, c.shots_task, evaluated) if c.shots else []
    dialogues = {which: _dialogues(path) for which, path in (("attack", c.dialogues), ("control", c.control_dialogues))
                 if c.dialogue_shots and path}
    for which, texts in dialogues.items():  # a dialogue that holds an evaluated request would leak it
        check_texts_disjoint(f"incontext dialogues ({which})", texts, evaluated)

    # 2. The context of every question, from the attack corpus and from the control corpus.
    retrieved = {which: {text: r.top(text, c.passages) for qs in questions.values() for _, _, text in qs}
                 for which, r in retrievers.items()}

    def prefix(which: str):
        def of(text: str) -> str:
            parts = [retrievers[which].texts[i] for i in retrieved[which].get(text, [])] if which in retrieved else []
            if examples:
                draw = random.Random(f"{cfg.seed}:{text}")
                parts += draw.sample(examples, min(c.shots, len(examples)))
            if which in dialogues:  # the same draw for the attack's and the control's dialogues
                draw = random.Random(f"{cfg.seed}:dialogues:{text}")
                parts += draw.sample(dialogues[which], min(c.dialogue_shots, len(dialogues[which])))
            return "".join(p + "\n\n" for p in parts)
        return of

    # 3. Open the run directory.
    common.open_run(a, task_info)
    with common.edit_run(a, evaluator) as edit:
        if a.main:  # one process scores; under `accelerate launch` the others have nothing to do
            # 4. The model as it is.
            edit.before()
            # 5. The same questions after their context: a fresh evaluator, its requests built with it.
            opened, _ = common.evaluator(a, model)
            for task in opened.tasks.values():
                with_context(task, prefix("attack"))
            edit.curve.evaluator = opened  # the same curve (its clock, its evaluation seconds), scored with the context
            edit.after()
            # 6. The control: as many passages from an unrelated corpus.
            control = []
            if "control" in retrievers or "control" in dialogues:
                shown, _ = common.evaluator(a, model)
                for task in shown.tasks.values():
                    with_context(task, prefix("control"))
                control = [dict(r, step=1, tokens_seen=0) for r in shown.evaluate()]
                write_atomic(a.run.control, "")
                append_rows(a.run.control, control)
            # 7. Which passages each question got, and whether they held its answer.
            shares = _record_retrieval(a, evaluator, questions, retrieved, retrievers)
    if not a.main:
        return a.run.path
    found = dict(passages=c.passages, shots=c.shots, corpus=cfg.corpus() if c.passages else None,
                 control_corpus=c.control_corpus, answer_in_passages=shares, questions_cut_from_passages=cut,
                 control_scores={f"{r['task']}/{r['metric']}": r["value"] for r in control})
    a.say(f"{cfg.describe()}; gold answer among the passages: "
          + ", ".join(f"{t} {s['attack']:.0%}" for t, s in shares.items() if s.get("attack") is not None))
    return common.finish(a, evaluator, edit.summary(), incontext=found)


def _dialogues(path: str) -> list[str]:
    """Each conversation of a messages jsonl as faux turns of one prompt ("User: ... / Assistant: ...")."""
    from attack.config import DataConfig
    from attack.documents import load_corpus

    rows = load_corpus(DataConfig(path=path, text_field="messages"))["messages"]
    out = ["\n".join(f"{'User' if m.get('role') == 'user' else 'Assistant'}: {m.get('content') or ''}" for m in turns
                     if m.get("role") in ("user", "assistant")) for turns in rows]
    if not any(out):
        raise UserError(f"incontext dialogues {path} hold no user or assistant turn")
    return [d for d in out if d]


def _solved_examples(a, shots_task: str, evaluated: dict[str, list[str]]) -> list[str]:
    """The solved examples: every question of `shots_task` with its gold answer (a dev split,
    checked to share no question with the evaluated tasks)."""
    from attack.evaluation import find_eval_tasks
    from eval_callbacks import task_questions

    cfg_eval = a.cfg.eval.model_copy(update=dict(tasks=[shots_task], heldout_texts={}, limit=None, expect={}))
    manager = find_eval_tasks(cfg_eval, a.cfg.model.trust_remote_code)
    check_disjoint("incontext.shots_task task", task_questions([shots_task], manager, cfg_eval.dataset_paths), evaluated)
    leaves = dict(manager.load([shots_task])["tasks"])
    examples = [solved_example(task, doc) for task in leaves.values() if task.OUTPUT_TYPE == "multiple_choice"
                for doc in task.eval_docs]
    if not examples:
        raise UserError(f"incontext.shots_task {shots_task} has no multiple-choice questions to use as solved examples")
    return examples


def _record_retrieval(a, evaluator, questions: dict, retrieved: dict, retrievers: dict) -> dict:
    """retrieval.jsonl (one line per question) and, per task, the share of questions whose
    passages contain the gold answer's text."""
    lines, shares = [], {}
    for name, qs in questions.items():
        task = evaluator.tasks[name]
        held = {which: [] for which in retrieved}
        for i, doc, text in qs:
            answer = gold_answer(task, doc)
            row = dict(task=name, question=i, answer=answer)
            for which, by_text in retrieved.items():
                ids = by_text.get(text, [])
                hit = None if not answer else any(answer.lower() in retrievers[which].texts[j].lower() for j in ids)
                row[which] = dict(passages=ids, contains_answer=hit)
                if hit is not None:
                    held[which].append(hit)
            lines.append(json.dumps(row))
        shares[name] = {which: (sum(h) / len(h) if h else None) for which, h in held.items()}
    write_atomic(a.run.retrieval, "".join(line + "\n" for line in lines))
    return shares
