"""Corpus preparation at scale: tokens/s, peak memory, cache size, and the cost of reuse.

    python bench/data_prep.py                       # 10M, 50M and 100M-token synthetic corpora
    python bench/data_prep.py --tokens 5e6 --num-proc 2

For each size, a synthetic jsonl corpus (documents of pseudo-words, 20 to 4,000 words long) is
written once; then `prepare_corpus` runs in a fresh process (the first cell: load with datasets,
tokenize with a fast BPE tokenizer trained here, pack to the memory-mapped store), and again in
another fresh process (a later cell: finds the cache). Prints one JSON line per size:
    tokens, documents, corpus_mb, prepare_s, tokens_per_s, peak_rss_mb (the preparing process;
    tokenizer workers, when num_proc > 1, are separate processes: workers_peak_rss_mb),
    cache_mb, reuse_s (the second cell, process start excluded), reuse_peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qui", "dor", "fen", "gal", "hem"]


def write_corpus(path: Path, tokens: int, tokens_per_word: float, seed: int = 0) -> int:
    """About `tokens` tokens of documents, streamed to disk; returns the number of documents."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(5000)]
    target_words, written, docs = int(tokens / tokens_per_word), 0, 0
    with open(path, "w") as f:
        while written < target_words:
            n = min(int(rng.lognormvariate(6, 1)) + 20, 4000)
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=n))}) + "\n")
            written, docs = written + n, docs + 1
    return docs


def child(args) -> None:
    """One cell's preparation in this (fresh) process; prints its timings as JSON."""
    from transformers import AutoTokenizer

    from attack.config import DataConfig
    from attack.packing import prepare_corpus

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    start = time.perf_counter()
    folder = prepare_corpus(DataConfig(path=args.corpus, seq_len=args.seq_len), tok, args.cache, args.num_proc)
    elapsed = time.perf_counter() - start
    print(json.dumps(dict(folder=str(folder), seconds=elapsed,
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          workers_peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)))


def run_child(args, corpus: Path, cache: Path, tokenizer: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--cache", str(cache), "--tokenizer",
           str(tokenizer), "--seq-len", str(args.seq_len)] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1e7,5e7,1e8", help="comma-separated corpus sizes in tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--workdir", default=None, help="where corpora and caches go (default: a temporary folder)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT))
    from attack.toyworld.models import train_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-datasets"), "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    sample = work / "sample.jsonl"
    write_corpus(sample, 200_000, 1.0)
    texts = [json.loads(line)["text"] for line in sample.read_text().splitlines()]
    tok = train_tokenizer(texts, work / "tokenizer", vocab_size=8192)
    tokens_per_word = len(tok(" ".join(texts[:50]))["input_ids"]) / len(" ".join(texts[:50]).split())
    for size in (int(float(x)) for x in args.tokens.split(",")):
        corpus = work / f"corpus-{size}.jsonl"
        docs = write_corpus(corpus, size, tokens_per_word)
        cache = work / f"cache-{size}"
        first = run_child(args, corpus, cache, work / "tokenizer", env)
        second = run_child(args, corpus, cache, work / "tokenizer", env)
        meta = json.loads((Path(first["folder"]) / "meta.json").read_text())
        cache_mb = sum(f.stat().st_size for f in Path(first["folder"]).iterdir()) / 2**20
        print(json.dumps(dict(
            tokens=meta["tokens_in_corpus"], documents=docs, corpus_mb=round(corpus.stat().st_size / 2**20, 1),
            seq_len=args.seq_len, prepare_s=round(first["seconds"], 2),
            tokens_per_s=round(meta["tokens_in_corpus"] / first["seconds"]),
            peak_rss_mb=round(first["peak_rss_mb"]), workers_peak_rss_mb=round(first["workers_peak_rss_mb"]),
            cache_mb=round(cache_mb, 1), reuse_s=round(second["seconds"], 2),
            reuse_peak_rss_mb=round(second["peak_rss_mb"]), cpus=os.cpu_count())), flush=True)


if __name__ == "__main__":
    main()
