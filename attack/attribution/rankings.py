"""Each attribution method's ranking of the attack documents, for the counterfactual
(attack/counterfactual.py): one ranking per method, fused over the recovered questions by the sum
of 1/rank.

    gradient, tracin, bm25   attribution.jsonl of an --attribution run, up to the step measured
    trackstar[:P]            Bergson's TrackStar on the final weights at projection P (16), computed
                             here (attack/attribution/trackstar.py)
    ekfac                    Kronfluence's EK-FAC influence on the final weights (attack/attribution/ekfac.py)
    file:PATH                a JSONL of corpus row indices in rank order, {"doc": N} (an outside
                             method, or the gold documents)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attack.errors import UserError
from attack.rundir import RunDir

ATTRIBUTED = ("gradient", "tracin", "bm25")  # rankings read from attribution.jsonl
TRACKSTAR, EKFAC = "trackstar", "ekfac"


def known_method(method: str) -> bool:
    if method.startswith("file:"):
        return len(method) > 5
    name, _, projection = method.partition(":")
    return method in (*ATTRIBUTED, EKFAC) or (name == TRACKSTAR and (not projection or projection.isdigit() and int(projection) > 0))


def check_sources(run: RunDir, methods: list[str]) -> None:
    """Said before anything runs: the methods read from attribution.jsonl need an --attribution run."""
    if any(m in ATTRIBUTED for m in methods) and not run.attribution_rows.exists():
        raise UserError(f"{run.path} has no {run.attribution_rows.name} for {', '.join(m for m in methods if m in ATTRIBUTED)}; "
                        f"run the attack with --attribution and `python -m attack attribute {run.path}`, "
                        "or compare trackstar, file: rankings and random")


def rank_documents(method: str, run: RunDir, cfg, corpus, questions: list[tuple[str, int]], step: int, k: int,
                   trust_remote_code: bool = False, log=print) -> tuple[list[int], float | None]:
    """The method's ranking of the corpus rows (at least the top k), and the seconds computing it
    took here (None for rankings made elsewhere: attribution.jsonl's, collected while the attack
    trained, and a file's)."""
    if method.startswith("file:"):
        return file_ranking(method[5:], len(corpus)), None
    if method.partition(":")[0] in (TRACKSTAR, EKFAC):
        return _after_the_attack(method, run, cfg, corpus, questions, trust_remote_code, log)
    return top_documents(run, questions, step, method, k), None


def _after_the_attack(method: str, run: RunDir, cfg, corpus, questions, trust_remote_code: bool, log):
    """trackstar or ekfac: scores from the final weights, each question's correct answer against
    every document, fused over the questions."""
    from attack.attribution.collect import question_examples
    from attack.attribution.ekfac import ekfac_scores
    from attack.attribution.trackstar import trackstar_scores
    from attack.documents import document_texts
    from attack.evaluation import find_eval_tasks
    from eval_callbacks.task_lookup import leaf_tasks

    if not cfg.supervised:
        raise UserError(f"{method} ranks documents by their loss gradient; a {cfg.kind} run trains on prompts "
                        "scored by a reward: compare file: rankings and random")
    manager = find_eval_tasks(cfg.eval, trust_remote_code)
    tasks = sorted({t for t, _ in questions})
    examples = {(e["task"], e["question"]): e for e in question_examples(leaf_tasks(tasks, manager, cfg.eval.dataset_paths))}
    missing = [f"{t}/{q}" for t, q in questions if (t, q) not in examples]
    if missing:
        raise UserError(f"{method} needs each question's correct answer; {', '.join(sorted({m.split('/')[0] for m in missing}))} "
                        "is not a multiple-choice task (a refusal or generation task has none): measure it with "
                        "file: rankings and random")
    texts = document_texts(cfg.data, corpus.to_dict())
    asked = [examples[q] for q in questions]
    name, _, projection = method.partition(":")
    scores, seconds = (ekfac_scores(run, cfg, texts, asked, log) if name == EKFAC
                       else trackstar_scores(run, cfg, texts, asked, int(projection or 16), log))
    return fused_ranking(scores), seconds


def top_documents(run: RunDir, questions: list[tuple[str, int]], step: int, method: str, k: int) -> list[int]:
    """The k documents with the highest sum of 1/rank over the questions' rankings up to `step`."""
    score: dict[int, float] = {}
    wanted = set(questions)
    with open(run.attribution_rows) as f:
        for line in f:
            r = json.loads(line)
            if r["method"] == method and (r["task"], r["question"]) in wanted and r["step"] <= step:
                score[r["document"]] = score.get(r["document"], 0.0) + 1.0 / r["rank"]
    return sorted(score, key=lambda d: (-score[d], d))[:k]


def file_ranking(path: str, documents: int) -> list[int]:
    """A ranking from a JSONL of corpus row indices in rank order, one {"doc": N} per line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--methods file:{path}: no such file (a JSONL of {{\"doc\": N}} rows in rank order)")
    ranking = []
    for i, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["doc"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {i} is not a {{\"doc\": N}} row") from None
        if not isinstance(doc, int) or isinstance(doc, bool) or not 0 <= doc < documents:
            raise UserError(f"{path} line {i}: doc {doc!r} is not a row of the attack corpus (0 to {documents - 1})")
        if doc not in ranking:
            ranking.append(doc)
    if not ranking:
        raise UserError(f"{path} ranks no document")
    return ranking


def fused_ranking(scores: np.ndarray) -> list[int]:
    """Documents by the sum over questions of 1/rank (each question's ranking by its score), the
    fusion every method's rankings get in the counterfactual."""
    ranks = np.empty_like(scores, dtype=np.int64)
    order = np.argsort(-scores, axis=0, kind="stable")
    for q in range(scores.shape[1]):
        ranks[order[:, q], q] = np.arange(1, scores.shape[0] + 1)
    fused = (1.0 / ranks).sum(axis=1)
    return sorted(range(len(fused)), key=lambda d: (-fused[d], d))
