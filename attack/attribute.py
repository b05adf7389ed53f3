"""`python -m attack attribute RUN_DIR`: which attack documents drove the recovery.

For each evaluation point N > 0 and each evaluated question, the attack documents trained on
since the previous point are ranked three ways and the top k written to attribution.jsonl
(method, task, question, step, rank, document, score):

    gradient   TracIn: the question's gradient at N (attribution/queries) against the update each
               row applied (Bergson's per-row gradients), credited to the row's documents by
               their share of its tokens. The score is the first-order change of the question's
               log-probability of its answer that the documents caused.
    bm25       BM25 (bm25s) of the question and its answer against the documents' text
    random     a random order of the same documents (seeded): the floor

`document` is the document's index in the attack corpus as loaded (its row in the file).
attribution_summary.json holds what the report shows: per task the documents that carried most
of the recovery, the recovered questions' top documents, how many of those state the answer,
and, where the corpus says which entity a document is about, recall@10 and MRR per method.

`python -m attack counterfactual RUN_DIR --task T --k 10` reruns the attack without the top-k
documents of T's questions and without k random documents, and compares T's recovery.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from attack.attribution import FOLDER
from attack.errors import ArgumentParser, UserError

METHODS = ("gradient", "bm25", "random")


def attribute(run_path: str | Path, top_k: int | None = None, gold_field: str | None = None) -> Path:
    """Write attribution.jsonl and attribution_summary.json into the run directory; returns the former."""
    from datasets import load_from_disk

    from attack.config import load_config, read_yaml
    from attack.data import PackedCorpus, document_texts, load_corpus

    run = Path(run_path)
    folder = run / FOLDER
    if not (folder / "queries").is_dir() or not (folder / "order.hf").is_dir():
        raise UserError(f"{run} holds no attribution data; run the attack with --attribution")
    cfg = load_config(read_yaml(run / "config.yaml"))
    top_k = top_k or cfg.attribution.top_k
    summary = json.loads((run / "summary.json").read_text())
    corpus = PackedCorpus(summary["corpus"])
    dataset = load_corpus(cfg.data)
    texts = document_texts(cfg.data, dataset.to_dict())
    gold_field = gold_field or ("entity" if "entity" in dataset.column_names else None)
    entities = [str(e) for e in dataset[gold_field]] if gold_field else None

    questions = json.loads((folder / "questions.json").read_text())
    order = load_from_disk(str(folder / "order.hf")).to_pandas()
    epochs = {int(k): v for k, v in json.loads((folder / "step_epochs.json").read_text()).items()}
    order["epoch"] = order.global_step.map(epochs)
    steps = sorted(int(p.stem.split("-")[1]) for p in (folder / "queries").glob("step-*.npy"))
    pieces = corpus.segments()  # (row, document, offset, first token, tokens)
    bm25 = _bm25(texts)
    rng = np.random.default_rng(0)
    correct = _correctness(run)

    rows, validation, credit = [], {m: [] for m in METHODS}, {}
    for prev, step in zip([0, *steps[:-1]], steps, strict=True):
        seg = order[(order.global_step > prev) & (order.global_step <= step)]
        if seg.empty:
            continue
        docs, weights = _row_documents(seg._idx.to_numpy(), pieces, corpus.meta["seq_len"])
        grads = np.stack([_epoch_grads(folder, int(e))[int(i)] for i, e in zip(seg._idx, seg.epoch, strict=True)])
        queries = np.load(folder / "queries" / f"step-{step}.npy")
        by_doc = (queries @ grads.astype(np.float32).T) @ weights  # (questions, documents of the segment)
        for qi, q in enumerate(questions):
            ranked = {
                "gradient": by_doc[qi],
                "bm25": bm25(q["context"] + q["answer"])[docs],
                "random": rng.random(len(docs)),
            }
            recovered = correct.get((q["task"], q["question"], step)) == 1 and correct.get((q["task"], q["question"], 0)) == 0
            for method, scores in ranked.items():
                top = np.argsort(-scores, kind="stable")[:top_k]
                rows += [dict(method=method, task=q["task"], question=q["question"], step=step, rank=r + 1,
                              document=int(docs[j]), score=float(scores[j])) for r, j in enumerate(top)]
                if step == steps[-1] and entities is not None:
                    gold = {j for j, d in enumerate(docs) if entities[d] and entities[d] in q["context"]}
                    if gold:
                        validation[method].append(_recall_mrr(np.argsort(-scores, kind="stable"), gold, 10))
            if recovered:
                for j, d in enumerate(docs):
                    credit[(q["task"], int(d))] = credit.get((q["task"], int(d)), 0.0) + float(by_doc[qi, j])

    out = run / "attribution.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "attribution_summary.json").write_text(json.dumps(
        _summary(rows, questions, texts, correct, credit, validation, steps, gold_field), indent=1))
    return out


def _row_documents(row_ids: np.ndarray, pieces: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents in these rows and a (rows, documents) matrix of each document's share of
    each row's tokens: the row-to-document map that turns a row's score into its documents'."""
    docs = np.unique(pieces[np.isin(pieces[:, 0], row_ids), 1])
    column = {int(d): j for j, d in enumerate(docs)}
    weights = np.zeros((len(row_ids), len(docs)), dtype=np.float32)
    by_row: dict[int, list] = {}
    for row, doc, _offset, _first, tokens in pieces[np.isin(pieces[:, 0], row_ids)]:
        by_row.setdefault(int(row), []).append((int(doc), int(tokens)))
    for i, row in enumerate(row_ids):
        for doc, tokens in by_row.get(int(row), []):
            weights[i, column[doc]] += tokens / seq_len
    return docs, weights


_EPOCHS: dict = {}


def _epoch_grads(folder: Path, epoch: int) -> np.ndarray:
    from bergson.data import load_gradients

    key = (str(folder), epoch)
    if key not in _EPOCHS:
        _EPOCHS[key] = load_gradients(folder / "train" / f"epoch_{epoch}")
    return _EPOCHS[key]


def _bm25(texts: list[str]):
    """score(query) -> BM25 score of every document."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    vocab = retriever.vocab_dict

    def score(query: str) -> np.ndarray:
        words = [w for w in re.findall(r"\w+", query.lower()) if w in vocab]
        return retriever.get_scores(words) if words else np.zeros(len(texts))

    return score


def _correctness(run: Path) -> dict:
    from eval_callbacks.callback import read_samples

    return {(r["task"], r["question"], r["step"]): r["correct"] for r in read_samples(run / "samples")}


def _recall_mrr(order: np.ndarray, gold: set, k: int) -> tuple[float, float]:
    hits = [i for i, j in enumerate(order) if j in gold]
    return len([i for i in hits if i < k]) / len(gold), 1.0 / (hits[0] + 1)


def _first_line(text: str, width: int = 100) -> str:
    line = next((x for x in text.splitlines() if x.strip()), "")
    return line[:width]


def _summary(rows, questions, texts, correct, credit, validation, steps, gold_field) -> dict:
    last = steps[-1]
    answers = {(q["task"], q["question"]): q["answer"].strip().lower() for q in questions}
    per_task = {}
    for task in sorted({q["task"] for q in questions}):
        mine = sorted(((d, s) for (t, d), s in credit.items() if t == task), key=lambda x: -x[1])[:5]
        recovered = sorted(q["question"] for q in questions if q["task"] == task
                           and correct.get((task, q["question"], last)) == 1 and correct.get((task, q["question"], 0)) == 0)
        top = [r for r in rows if r["method"] == "gradient" and r["task"] == task and r["step"] == last
               and r["question"] in set(recovered)]
        stating = [answers[(task, r["question"])] in texts[r["document"]].lower() for r in top]
        per_task[task] = dict(
            recovered=len(recovered), questions=sum(q["task"] == task for q in questions),
            carried_most=[dict(document=d, score=s, first_line=_first_line(texts[d])) for d, s in mine],
            recovered_examples=[dict(question=q, documents=[dict(document=r["document"], first_line=_first_line(texts[r["document"]]))
                                                          for r in top if r["question"] == q][:3]) for q in recovered[:5]],
            top_documents_stating_answer=(sum(stating) / len(stating)) if stating else None)
    quality = {m: dict(recall_at_10=float(np.mean([v[0] for v in vals])), mrr=float(np.mean([v[1] for v in vals])),
                       questions=len(vals)) for m, vals in validation.items() if vals}
    return dict(steps=steps, gold_field=gold_field, tasks=per_task, validation=quality)


# --- the commands -----------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m attack attribute", description="Rank the attack documents behind each "
                       "evaluated question's recovery (gradient, BM25, random); writes attribution.jsonl.")
    p.add_argument("run", help="a run directory of an attack run with --attribution")
    p.add_argument("--top-k", type=int, help="documents kept per question and point (default: the run's attribution.top_k)")
    p.add_argument("--gold-field", help="corpus column naming the entity each document is about, for recall@10 and "
                   "MRR (default: 'entity' when the corpus has it)")
    args = p.parse_args(argv)
    out = attribute(args.run, args.top_k, args.gold_field)
    quality = json.loads((Path(args.run) / "attribution_summary.json").read_text())["validation"]
    print(f"attribution: {out}")
    for method, q in quality.items():
        print(f"  {method:<9} recall@10 {q['recall_at_10']:.3f}  MRR {q['mrr']:.3f}  ({q['questions']} questions)")
    return 0
