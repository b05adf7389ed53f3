"""Corpus preparation: the prepared rows are the in-memory packing's rows; the cache is reused,
never half-used, and remembers which documents each row holds."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from attack.config import DataConfig
from attack.documents import load_documents
from attack.packing import PackedCorpus, corpus_key, pack_documents, prepare_corpus


@pytest.fixture
def corpus(tmp_path):
    """Long documents, empty ones, one-word ones, and documents longer than several rows."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "creature", "river", "moss", "the", "of"]
    docs = [{"text": " ".join(rng.choice(words) for _ in range(rng.choice([0, 1, 3, 20, 150])))} for _ in range(300)]
    docs[7]["text"] = "   \n "
    docs[8]["text"] = None
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path, docs


def test_prepared_rows_equal_in_memory_packing(corpus, world, tmp_path):
    path, docs = corpus
    cfg = DataConfig(path=str(path), seq_len=16)
    tok = world["tokenizer"]
    prepared = PackedCorpus(prepare_corpus(cfg, tok, tmp_path / "cache"))
    reference = pack_documents(load_documents(cfg), tok, 16)
    assert len(prepared) == reference["input_ids"].shape[0] > 100
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.stack([prepared[i][key] for i in range(len(prepared))]), reference[key]), key
    # every document is recovered from its segments, in order, with its EOS, indexed by its source line
    seg = prepared.segments()
    for doc in sorted(set(seg[:, 1]))[:-1]:  # the last may be cut by the dropped remainder
        pieces = seg[seg[:, 1] == doc]
        assert list(pieces[:, 3]) == list(np.concatenate([[0], np.cumsum(pieces[:-1, 4])]))
        got = np.concatenate([prepared.ids[row][offset:offset + n] for row, _, offset, _, n in pieces])
        assert got.tolist() == tok(docs[doc]["text"])["input_ids"] + [tok.eos_token_id]
    assert 7 not in set(seg[:, 1]) and 8 not in set(seg[:, 1])  # empty documents hold no tokens


def test_cache_is_reused_and_keyed_by_what_decides_the_rows(corpus, world, tmp_path, monkeypatch):
    path, _ = corpus
    tok = world["tokenizer"]
    cfg = DataConfig(path=str(path), seq_len=16)
    first = prepare_corpus(cfg, tok, tmp_path / "cache")
    import attack.packing

    def fail(*a, **k):
        raise AssertionError("prepared again instead of reusing the cache")

    monkeypatch.setattr(attack.packing, "_tokenize_and_pack", fail)
    assert prepare_corpus(cfg, tok, tmp_path / "cache") == first
    monkeypatch.undo()
    other = prepare_corpus(DataConfig(path=str(path), seq_len=32), tok, tmp_path / "cache")
    assert other != first
    path.write_text(path.read_text() + json.dumps({"text": "one more document"}) + "\n")  # new content, same path
    changed = prepare_corpus(cfg, tok, tmp_path / "cache")
    assert changed != first and PackedCorpus(changed).meta["documents"] == PackedCorpus(first).meta["documents"] + 1
    assert corpus_key(cfg, "sha256:x", tok) != corpus_key(cfg, "sha256:y", tok)


@pytest.mark.slow
def test_killed_preparation_leaves_no_usable_half(corpus, world, tmp_path):
    """A preparation killed mid-way (os._exit: no clean-up runs) is never mistaken for a corpus."""
    path, _ = corpus
    tok_dir = tmp_path / "tok"
    world["tokenizer"].save_pretrained(str(tok_dir))
    script = f"""
import os, attack.packing as d
from transformers import AutoTokenizer
from attack.config import DataConfig
real = d._segments
def die(*a, **k):
    real(*a, **k)
    os._exit(9)  # killed after writing part of the rows
d._segments = die
d.prepare_corpus(DataConfig(path={str(path)!r}, seq_len=16), AutoTokenizer.from_pretrained({str(tok_dir)!r}), {str(tmp_path / 'cache')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    left = list((tmp_path / "cache").iterdir())
    assert any(".partial-" in p.name for p in left) and not any((p / "meta.json").exists() for p in left)
    folder = prepare_corpus(DataConfig(path=str(path), seq_len=16), world["tokenizer"], tmp_path / "cache")
    reference = pack_documents(load_documents(DataConfig(path=str(path), seq_len=16)), world["tokenizer"], 16)
    assert torch.equal(torch.from_numpy(np.asarray(PackedCorpus(folder).ids, dtype=np.int64)), reference["input_ids"])


def test_summary_counts_documents_seen_within_the_budget(make_config, tmp_path):
    from attack.recipes import run_attack

    run = run_attack(make_config(train={"max_steps": 2, "batch_size": 2}, data={"seq_len": 64, "cache_dir": str(tmp_path / "c")}),
                     quiet=True)
    s = json.loads((run / "summary.json").read_text())
    assert s["rows_trained"] == s["distinct_rows_trained"] == 4 and s["distinct_tokens_trained"] == 4 * 64
    assert 0 < s["documents_seen"] < s["documents"]


def test_a_tail_that_fills_no_row_is_said(world, tmp_path):
    """30 short documents in rows of 64 tokens: what fills no row is named in one line, with the
    documents lost wholly, instead of only in summary.json."""
    from attack.data import load_attack_rows

    docs = tmp_path / "small.jsonl"
    docs.write_text("".join(json.dumps({"text": f"The creature number {i} lives in the marsh."}) + "\n" for i in range(30)))
    said = []
    rows = load_attack_rows(DataConfig(path=str(docs), seq_len=64, cache_dir=str(tmp_path / "cache")), world["tokenizer"],
                            1, log=said.append)
    meta = rows.meta
    tail = meta["tokens_in_corpus"] - meta["tokens"]
    assert tail > 0
    [warning] = [s for s in said if s.startswith("warning:")]
    assert f"last {tail:,} tokens fill no row of 64" in warning
    lost = meta["documents"] - meta["documents_in_rows"]
    assert (f"({lost} of 30 documents wholly)" in warning) == (lost > 0)
