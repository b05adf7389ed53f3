"""TrackStar (Chang et al. 2024, 2410.17413) through Bergson's own pipeline, after the attack:
each attack document's loss gradient and each recovered question's gradient of -log p(its correct
answer | its context), taken at the attacked weights (a LoRA adapter's modules, or the whole
model), randomly projected to `projection` numbers per module, unit-normalised and
preconditioned by a Hessian mixed from the query and the training autocorrelations (the mixed
query/train Hessian of the paper's A.1.3). A document's score for a question is the inner product.

Unlike `gradient` and `tracin` (attack/attribution/collect.py, collected at every evaluation
point while the attack trains), it needs no --attribution run: only the finished run's final/
weights, its corpus and its tasks. Everything Bergson writes stays in
counterfactual/trackstar-p<projection>/ of the run, with the seconds it took.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from attack.attribution import library_output_to, scores_once
from attack.rundir import RunDir

# The question and its answer as lm-eval scores them: the context, then the answer's tokens. The
# answer is Bergson's "assistant" turn, so the query's loss is on the answer alone.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def trackstar_scores(run: RunDir, cfg, documents: list[str], questions: list[dict], projection: int = 16,
                     log=print) -> tuple[np.ndarray, float]:
    """Scores (documents x questions) and the seconds they took; computed once per projection
    and question set, then read back."""
    key = json.dumps([projection, len(documents), [(q["task"], q["question"]) for q in questions]])

    def compute(folder: Path) -> tuple[np.ndarray, float, dict]:
        from bergson.cli.trackstar import trackstar
        from bergson.config.config import DataConfig, QuerySetConfig, TrackstarConfig, TrackstarIndexConfig
        from bergson.data import load_scores
        from bergson.utils.worker_utils import max_tokens_for_model
        from transformers import AutoTokenizer

        _write_jsonl(folder / "documents.jsonl", [{"text": t} for t in documents])
        _write_jsonl(folder / "questions.jsonl", [{"prompt": q["context"], "completion": q["answer"]} for q in questions])
        tokenizer = AutoTokenizer.from_pretrained(str(run.final), trust_remote_code=cfg.model.trust_remote_code)
        if not cfg.model.chat_template:  # evaluated as plain text: the question is read as it was scored
            tokenizer.chat_template = PLAIN_TEMPLATE
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        start = time.perf_counter()
        longest = max_tokens_for_model(tokenizer, str(run.final), None, cfg.model.trust_remote_code)
        index = TrackstarIndexConfig(
            run_path=str(folder / "bergson"), model=str(run.final), tokenizer=str(folder / "tokenizer"),
            data=DataConfig(dataset=str(folder / "documents.jsonl"), prompt_column="text", truncation=True),
            projection_dim=projection, precision="fp32", token_batch_size=min(2048, longest))
        query = QuerySetConfig(dataset=str(folder / "questions.jsonl"), prompt_column="prompt",
                               completion_column="completion")
        # the paper's downweighting of the top components, scaled to the gradient's size (~1000 of 65K there)
        components = max(1, round(1000 / 65536 * projection * projection * 2))
        with library_output_to(folder / "bergson.log"):
            trackstar(index, TrackstarConfig(query=query, stats_sample_size=None, target_downweight_components=components))
        seconds = time.perf_counter() - start
        stored = load_scores(folder / "bergson" / "scores")
        scores = np.asarray(stored[:], dtype=np.float64).reshape(len(documents), len(questions))
        log(f"  trackstar (projection {projection}): {len(documents)} documents x {len(questions)} questions "
            f"in {seconds:.0f} s")
        return scores, seconds, {}

    return scores_once(run, run.trackstar(projection), key, "trackstar", compute)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
