"""`python -m attack attribute RUN_DIR`: which attack documents drove the recovery.

For each evaluation point N > 0 and each evaluated question, the attack documents trained on
since the previous point are ranked four ways and the top k written to attribution.jsonl
(method, task, question, step, rank, document, score):

    gradient   the question's gradient at N (attribution/queries) against the update each
               document applied in the segment (attribution/train, one gradient per document
               piece, summed per document), both normalised per adapted module, the question's
               made specific by subtracting the mean gradient of its task's questions. Without
               that, every question ranks first the few documents with the largest updates and
               the ones teaching the answer format all questions share.
    tracin     the raw inner product of the same two (TracIn; the question's gradient passes through
               the same Adam second-moment correction as the updates, as Bergson queries an index,
               so it is proportional to, not equal to, the change in log-probability). Summed over
               the recovered questions it says which documents carried the recovery.
    bm25       BM25 (bm25s) of the question and its answer against the documents' text
    random     a random order of the same documents (seeded): the floor

`document` is the document's index in the attack corpus as loaded (its row in the file).
attribution_summary.json holds what the report shows: per task the recovered questions (wrong
at step 0, right at N), the documents that carried most of their recovery, their top documents,
how many of those mention the entity asked about, and, where the corpus names each document's
entity, recall@10, hit@10 and MRR per method at the last point.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from attack.errors import ArgumentParser, UserError
from attack.files import write_atomic
from attack.rundir import AttributionFiles, RunDir

METHODS = ("gradient", "tracin", "bm25", "random")
RECALL_K = 10


def attribute(run_path: str | Path, top_k: int | None = None, gold_field: str | None = None) -> Path:
    """Write attribution.jsonl and attribution_summary.json into the run directory; returns the former."""
    from attack.config import load_config, read_yaml
    from attack.documents import document_texts, load_corpus

    run = RunDir(Path(run_path))
    files = run.attribution
    if not files.queries.is_dir() or not files.order.is_dir():
        raise UserError(f"{run.path} holds no attribution data; run the attack with --attribution")
    cfg = load_config(read_yaml(run.config))
    top_k = top_k or cfg.attribution.top_k
    dataset = load_corpus(cfg.data)
    texts = document_texts(cfg.data, dataset.to_dict())
    if gold_field is not None and gold_field not in dataset.column_names:
        raise UserError(f"--gold-field {gold_field}: the attack corpus has no such column "
                        f"(it has {', '.join(dataset.column_names)})")
    gold_field = gold_field or ("entity" if "entity" in dataset.column_names else None)
    entities = [str(e) if e is not None else "" for e in dataset[gold_field]] if gold_field else None

    questions = json.loads(files.questions.read_text())
    pieces = np.load(files.pieces)  # (row, document, offset, first token, tokens) of the packed corpus
    order = _training_order(files)
    modules = _module_bounds(files)
    steps = files.query_steps()
    bm25 = _bm25(texts)
    rng = np.random.default_rng(0)
    correct = correctness(run)
    tasks = [q["task"] for q in questions]

    rows, validation, credit = [], [], {}
    for prev, step in zip([0, *steps[:-1]], steps, strict=True):
        seg = order[(order.global_step > prev) & (order.global_step <= step)]
        if seg.empty:
            continue
        docs, updates = _document_updates(files, seg, pieces)
        queries = np.load(files.query(step)).astype(np.float64)
        tracin = queries @ updates.T
        specific = _specific(queries, tasks, modules) @ _per_module_unit(updates, modules).T
        for qi, q in enumerate(questions):
            ranked = {
                "gradient": specific[qi],
                "tracin": tracin[qi],
                "bm25": bm25(q["context"] + q["answer"])[docs],
                "random": rng.random(len(docs)),
            }
            for method, scores in ranked.items():
                top = np.argsort(-scores, kind="stable")[:top_k]
                rows += [dict(method=method, task=q["task"], question=q["question"], step=step, rank=r + 1,
                              document=int(docs[j]), score=float(scores[j])) for r, j in enumerate(top)]
            key = (q["task"], q["question"])
            if correct.get((*key, step)) == 1 and correct.get((*key, 0)) == 0:  # recovered by step N
                for j, d in enumerate(docs):
                    credit[(q["task"], int(d))] = credit.get((q["task"], int(d)), 0.0) + float(tracin[qi, j])
            if step == steps[-1] and entities is not None:
                gold = {j for j, d in enumerate(docs) if entities[d] and entities[d] in q["context"]}
                if gold:
                    validation.append(dict(task=q["task"], correct=correct.get((*key, step)) == 1, **{
                        m: _recall_mrr(np.argsort(-s, kind="stable"), gold, RECALL_K) for m, s in ranked.items()}))

    write_atomic(run.attribution_rows, "".join(json.dumps(r) + "\n" for r in rows))
    summary = _summary(rows, questions, texts, entities, correct, credit, validation, steps, gold_field)
    write_atomic(run.attribution_summary, json.dumps(summary, indent=1))
    return run.attribution_rows


def _training_order(files: AttributionFiles):
    """Which document piece trained at which step, and the epoch folder holding its update."""
    from datasets import load_from_disk

    order = load_from_disk(str(files.order)).to_pandas()
    epochs = {int(k): v for k, v in json.loads(files.step_epochs.read_text()).items()}
    order["epoch"] = order.global_step.map(epochs)
    return order


def _document_updates(files: AttributionFiles, seg, pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documents trained on in `seg` (order rows: piece, step, epoch) and the update each
    applied: the sum over its pieces (a document split across rows, or trained twice, adds up)."""
    epochs = {int(e): _epoch_grads(files, int(e)) for e in seg.epoch.unique()}
    grads = np.stack([epochs[int(e)][int(i)] for i, e in zip(seg._idx, seg.epoch, strict=True)])
    docs, column = np.unique(pieces[seg._idx.to_numpy(), 1], return_inverse=True)
    updates = np.zeros((len(docs), grads.shape[1]))
    np.add.at(updates, column, grads.astype(np.float64))
    return docs, updates


def _module_bounds(files: AttributionFiles) -> list[tuple[int, int]]:
    """Column range of each adapted module in the stored gradients (Bergson's layout)."""
    info = json.loads(next(files.train.glob("epoch_*/info.json")).read_text())
    ends = np.cumsum(list(info["grad_sizes"].values()))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _per_module_unit(x: np.ndarray, modules) -> np.ndarray:
    """Each module's block scaled to unit length, so every adapted module counts alike: raw
    gradients are dominated by a few modules and by the documents with the largest updates."""
    out = np.empty_like(x)
    for lo, hi in modules:
        block = x[:, lo:hi]
        out[:, lo:hi] = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-30)
    return out


def _specific(queries: np.ndarray, tasks: list[str], modules) -> np.ndarray:
    """The questions' gradients made specific to each question: per-module unit blocks minus
    the mean over the task's questions, which is the direction that raises every answer of
    the task alike (its format, its prompt)."""
    q = _per_module_unit(queries, modules)
    tasks = np.asarray(tasks)
    for task in np.unique(tasks):
        mine = tasks == task
        if mine.sum() > 1:
            q[mine] -= q[mine].mean(axis=0)
    return q


def _epoch_grads(files: AttributionFiles, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s stored updates, memory-mapped (rows: pieces of the packed corpus)."""
    from bergson.data import load_gradients

    return load_gradients(files.train / f"epoch_{epoch}")


def _bm25(texts: list[str]):
    """score(query) -> BM25 score of every document."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its debug lines otherwise reach a configured root logger
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    vocab = retriever.vocab_dict

    def score(query: str) -> np.ndarray:
        words = [w for w in re.findall(r"\w+", query.lower()) if w in vocab]
        return retriever.get_scores(words) if words else np.zeros(len(texts))

    return score


def correctness(run: RunDir) -> dict:
    """{(task, question, step): 1 or 0} from the run's per-question records."""
    from eval_callbacks.callback import read_samples

    return {(r["task"], r["question"], r["step"]): r["correct"] for r in read_samples(run.samples)}


def _recall_mrr(order: np.ndarray, gold: set, k: int) -> tuple[float, float, float]:
    """(hit@k: any gold document in the top k; recall@k: the share of the gold documents that are
    in the top k; the reciprocal rank of the first gold document)."""
    ranks = [i for i, j in enumerate(order) if j in gold]
    return float(ranks[0] < k), sum(i < k for i in ranks) / len(gold), 1.0 / (ranks[0] + 1)


def _first_line(text: str, width: int = 100) -> str:
    return next((x for x in text.splitlines() if x.strip()), "")[:width]


def _quality(validation: list[dict]) -> dict:
    """Per method, the field's retrieval metrics over the questions with gold documents (and over
    those the model answers correctly at the last point): recall@10, the share of a question's
    gold documents in its top 10; hit@10, whether any is (what some attribution papers call
    recall); MRR, the mean reciprocal rank of the first gold document."""
    out = {}
    for method in METHODS:
        for subset, rows in (("all", validation), ("answered_correctly", [v for v in validation if v["correct"]])):
            if rows:
                hit, recall, mrr = np.mean([v[method] for v in rows], axis=0)
                out.setdefault(method, {})[subset] = dict(recall_at_10=float(recall), hit_at_10=float(hit),
                                                          mrr=float(mrr), questions=len(rows))
    return out


def _summary(rows, questions, texts, entities, correct, credit, validation, steps, gold_field) -> dict:
    last = steps[-1]
    per_task = {}
    top_by_question: dict = {}
    for r in rows:
        if r["method"] == "gradient" and r["step"] == last:
            top_by_question.setdefault((r["task"], r["question"]), []).append(r["document"])
    for task in sorted({q["task"] for q in questions}):
        mine = [q for q in questions if q["task"] == task]
        recovered = [q for q in mine if correct.get((task, q["question"], last)) == 1
                     and correct.get((task, q["question"], 0)) == 0]
        carried = sorted(((d, s) for (t, d), s in credit.items() if t == task), key=lambda x: -x[1])[:5]
        mention = None
        if entities is not None and recovered:
            # does a recovered question's top document mention an entity named in the question?
            tops = [(q, d) for q in recovered for d in top_by_question.get((task, q["question"]), [])]
            mention = float(np.mean([bool(entities[d]) and entities[d] in q["context"] for q, d in tops])) if tops else None
        per_task[task] = dict(
            questions=len(mine), recovered=len(recovered),
            carried_most=[dict(document=d, score=s, first_line=_first_line(texts[d])) for d, s in carried],
            recovered_examples=[dict(question=q["question"], text=_first_line(q["context"]), answer=q["answer"].strip(),
                                     documents=[dict(document=d, first_line=_first_line(texts[d]))
                                                for d in top_by_question.get((task, q["question"]), [])[:3]])
                                for q in recovered[:5]],
            top_documents_mentioning_entity=mention)
    return dict(steps=steps, gold_field=gold_field, tasks=per_task, validation=_quality(validation))


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m attack attribute", description="Rank the attack documents behind each "
                       "evaluated question's recovery (gradient, TracIn, BM25, random); writes attribution.jsonl.")
    p.add_argument("run", help="a run directory of an attack run with --attribution")
    p.add_argument("--top-k", type=int, help="documents kept per question and point (default: the run's attribution.top_k)")
    p.add_argument("--gold-field", help="corpus column naming the entity each document is about, for recall@10, hit@10 and "
                   "MRR (default: 'entity' when the corpus has it)")
    args = p.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    out = attribute(args.run, args.top_k, args.gold_field)
    print(f"attribution: {out}")
    print(describe_quality(json.loads(RunDir(Path(args.run)).attribution_summary.read_text())["validation"]))
    return 0


def describe_quality(quality: dict) -> str:
    lines = []
    for method, subsets in quality.items():
        q = subsets["all"]
        lines.append(f"  {method:<9} recall@10 {q['recall_at_10']:.3f}  hit@10 {q['hit_at_10']:.3f}  "
                     f"MRR {q['mrr']:.3f}  ({q['questions']} questions)")
    return "\n".join(lines) if lines else "  (no gold documents known: the corpus names no entity per document)"
