"""Held-out text as a loss measurement (eval.heldout_texts): documents of the forget domain (and
a general one) the attack never trains on, scored at every evaluation point as lm-eval's
`loglikelihood_rolling` tasks: bits per byte (the headline), word and byte perplexity. The report
turns them into tokens to baseline (attack/report/heldout.py).

Each source becomes a task of its own name: its documents are copied into a cache folder as
jsonl with a generated task YAML beside them, so lm-eval scores them exactly as it scores
wikitext. A held-out document that shares a 13-word window with the attack corpus is refused:
loss on text the attack trained on measures memorisation, not recovery.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from attack.config import DataConfig, EvalConfig
from attack.errors import UserError
from attack.files import write_atomic

NGRAM = 13  # the window of the GPT-3 / lm-eval decontamination checks

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
metadata:
  version: 1.0
"""


def documents(cfg: EvalConfig, task: str) -> list[str]:
    """The held-out documents of `task` (a jsonl/json/csv/parquet file with a text field, or a
    .txt file, one document per line)."""
    from attack.documents import load_documents

    path = cfg.heldout_texts[task]
    if not Path(path).expanduser().is_file():
        raise UserError(f"eval.heldout_texts: {task}'s file not found: {path} (a local jsonl or txt file of documents)")
    try:
        return load_documents(DataConfig(path=str(Path(path).expanduser()), text_field=cfg.heldout_text_field))
    except UserError as e:
        raise UserError(f"eval.heldout_texts {task}: {e}") from None


def task_folder(cfg: EvalConfig, cache: str | Path = ".cache/heldout") -> Path | None:
    """The folder of generated task YAMLs (and their documents) for eval.heldout_texts, keyed by
    the sources' contents; None when there are none."""
    if not cfg.heldout_texts:
        return None
    docs = {task: documents(cfg, task) for task in sorted(cfg.heldout_texts)}
    key = hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache).absolute() / key
    for task, texts in docs.items():
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", task):
            raise UserError(f"eval.heldout_texts: task name {task!r} must be a plain name (letters, digits, _ . -)")
        data = folder / f"{task}.jsonl"
        if not data.exists():
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(data, "".join(json.dumps({"text": t}) + "\n" for t in texts))
        yaml_path = folder / f"{task}.yaml"
        if not yaml_path.exists():
            write_atomic(yaml_path, TASK_YAML.format(name=task, data=data))
    return folder


def _ngrams(text: str) -> set[int]:
    """The document's 13-word windows; a shorter document is one window, itself whole."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < NGRAM:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i:i + NGRAM])) for i in range(len(words) - NGRAM + 1)}


def check_not_trained_on(cfg: EvalConfig, corpora: list[DataConfig]) -> None:
    """Refuse held-out documents that share a 13-word window with a corpus the attack trains on
    (read once, document by document)."""
    if not cfg.heldout_texts:
        return
    from attack.documents import document_texts, load_corpus

    held = {task: [_ngrams(d) for d in documents(cfg, task)] for task in cfg.heldout_texts}
    windows = set().union(*(g for docs in held.values() for g in docs))
    if not windows:
        return
    for corpus in corpora:
        for batch in load_corpus(corpus).iter(batch_size=1000):
            for text in document_texts(corpus, batch):
                shared = _ngrams(text) & windows
                if not shared:
                    continue
                task, i = next((t, i) for t, docs in held.items() for i, g in enumerate(docs) if g & shared)
                raise UserError(f"eval.heldout_texts {task}: document {i} shares a {NGRAM}-word passage with the attack "
                                f"corpus {corpus.path}; held-out text must be text the attack never trains on")
