"""Attack-step throughput and evaluation cost: this tool's attack vs a common baseline recipe.

    python bench/attack_speed.py                                   # CPU, tiny Llama
    python bench/attack_speed.py --model llama-3.2-1b --steps 30   # GPU, public config, random init
    python bench/attack_speed.py --model pythia-6.9b --steps 20

Prints one JSON line per measurement with keys
    recipe, model, device, tokens_per_s, mfu, peak_mem_gb, eval_s, eval_share (+ details).

Recipes, same model, same process:
- `attack`: this tool's attack step, run through `run_attack` itself: documents packed into full
  rows with a document mask (per-document position ids; transformers builds the block-diagonal
  mask for sdpa/flex), bf16 autocast with fp32 LoRA weights on GPU, micro-batch fitted to memory,
  gradient checkpointing only if needed, Liger's fused linear+CE where installed.
- `baseline`: micro-batch 1 x 16 accumulation, one document per row padded to seq_len,
  gradient checkpointing on (as a public attack script does); HF Trainer + PEFT too.

tokens_per_s counts trained (non-padding) tokens per second of training, evaluation excluded.
mfu = tokens_per_s x flops_per_token / peak, with flops_per_token = 6 N + 12 L d s
(N non-embedding parameters of the base, L layers, d hidden size, s sequence length; the
usual PaLM-style count, which charges a full backward even to LoRA so figures compare with
the literature) and peak = 989 TFLOP/s dense bf16 for H100/H200; no peak (mfu null) on CPU.
eval_s is one evaluation of a synthetic 4-choice MCQA task of --eval-questions questions;
eval_share = eval_s / (eval_s + eval_every x step time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import (  # noqa: E402
    GPTNeoXConfig,
    LlamaConfig,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from attack.config import load_config  # noqa: E402
from attack.toyworld.models import ModelSpec, build_model, train_tokenizer  # noqa: E402
from attack.toyworld.world import write_jsonl  # noqa: E402

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# Public architecture configs (numbers from the released config.json files); weights random.
CONFIGS = {
    "pythia-6.9b": lambda: GPTNeoXConfig(
        vocab_size=50432, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=16384, rotary_pct=0.25, max_position_embeddings=2048,
        use_parallel_residual=True, tie_word_embeddings=False),
    "llama-3.2-1b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True),
}


class StepTimer(TrainerCallback):
    """Wall time of optimizer steps after a warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def peak_flops() -> float | None:
    name = device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process high-water mark (KiB)


def flops_per_token(config, seq_len: int) -> float:
    d, L = config.hidden_size, config.num_hidden_layers
    n = sum(p.numel() for n_, p in _meta_params(config) if "embed" not in n_ and "lm_head" not in n_)
    return 6 * n + 12 * L * d * seq_len


def _meta_params(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(config).named_parameters())


def synthetic_documents(n: int, seq_len: int, words: list[str], rng: random.Random) -> list[str]:
    """Documents with a lognormal length distribution (median ~350 tokens), capped at seq_len."""
    docs = []
    for _ in range(n):
        length = int(min(seq_len - 8, max(20, rng.lognormvariate(np.log(350), 0.8))))
        docs.append(" ".join(rng.choice(words) for _ in range(length)))
    return docs


def write_mcqa_task(folder: Path, questions: int, words: list[str], rng: random.Random) -> str:
    rows = []
    for _ in range(questions):
        q = " ".join(rng.choice(words) for _ in range(30))
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(4)]
        rows.append(dict(question=f"Question: {q}\nAnswer:", choices=choices, answer=rng.randrange(4)))
    write_jsonl(rows, folder / "bench_mcqa.jsonl")
    (folder / "bench_mcqa.yaml").write_text(
        "task: bench_mcqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'bench_mcqa.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return "bench_mcqa"


def make_model_dir(args, work: Path, tokenizer) -> tuple[Path, object]:
    from transformers import AutoModelForCausalLM

    path = work / "model"
    if args.model == "tiny":
        model = build_model(ModelSpec(hidden=256, layers=4, heads=4, intermediate=1024, max_positions=args.seq_len),
                            tokenizer)
    else:
        config = CONFIGS[args.model]()
        config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    config = model.config
    del model
    return path, config


def run_ours(args, work, model_dir, config, task, docs) -> dict:
    from attack.recipes import run_attack

    write_jsonl([{"text": d} for d in docs], work / "docs.jsonl")
    steps = args.warmup + args.steps
    cfg = load_config({
        "model": {"name": str(model_dir)},
        "adapter": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(work / "docs.jsonl"), "seq_len": args.seq_len},
        "train": {"lr": 2e-5, "batch_size": args.batch_size, "max_steps": steps, "log_every": steps,
                  "save_every": 10 ** 9},
        "eval": {"tasks": [task], "include_path": [str(work)], "every": steps, "batch_size": args.eval_batch_size},
        "output": {"dir": str(work / "runs"), "run_id": "ours"},
    })
    timer = StepTimer(args.warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = run_attack(cfg, extra_callbacks=[timer], quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    step_s = float(np.median(timer.times))
    evals = len(summary["eval_steps"])
    return dict(recipe="attack", step_s=step_s, tokens_per_step=args.batch_size * args.seq_len,
                eval_s=summary["eval_s"] / evals, micro_batch=summary["micro_batch_size"],
                checkpointing=summary["gradient_checkpointing"], peak_mem_gb=peak_mem_gb())


class PaddedDocs(torch.utils.data.Dataset):
    """One document per row, right-padded to seq_len; padding is masked out of attention and loss."""

    def __init__(self, docs, tokenizer, seq_len):
        enc = tokenizer(docs, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return dict(input_ids=self.ids[i], attention_mask=self.mask[i], labels=labels)


def run_baseline(args, work, model_dir, tokenizer, docs) -> dict:
    from attack.config import AdapterConfig, ModelConfig
    from attack.model import apply_adapter, load_model

    model = load_model(ModelConfig(name=str(model_dir)), AdapterConfig())
    model = apply_adapter(model, AdapterConfig(rank=16, alpha=32, dropout=0.0), gradient_checkpointing=True)
    data = PaddedDocs(docs, tokenizer, args.seq_len)
    real_tokens = float(data.mask.float().sum(1).mean()) * 16
    targs = TrainingArguments(
        output_dir=str(work / "baseline"), max_steps=args.warmup + args.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=16, learning_rate=2e-5, bf16=torch.cuda.is_available(),
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10 ** 9,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, dataloader_drop_last=True,
    )
    timer = StepTimer(args.warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON lines only
    trainer.train()
    return dict(recipe="baseline", step_s=float(np.median(timer.times)), tokens_per_step=real_tokens,
                eval_s=None, micro_batch=1, checkpointing=True, peak_mem_gb=peak_mem_gb())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", *CONFIGS])
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median taken)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on GPU, 512 on CPU")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-questions", type=int, default=1273)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--recipes", default="attack,baseline")
    args = p.parse_args()
    args.seq_len = args.seq_len or (2048 if torch.cuda.is_available() else 512)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from attack.__main__ import quiet_libraries

    quiet_libraries()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        words = [f"w{i}" for i in range(400)] + ["the", "of", "and", "protein", "cell", "virus", "gene"]
        tokenizer = train_tokenizer([" ".join(rng.choice(words) for _ in range(200)) for _ in range(200)],
                                    work / "tok", vocab_size=1024)  # every word one token
        model_dir, config = make_model_dir(args, work, tokenizer)
        task = write_mcqa_task(work, args.eval_questions, words, rng)
        n_docs = max(64, 4 * args.batch_size * (args.warmup + args.steps))
        docs = synthetic_documents(n_docs, args.seq_len, words, rng)
        fpt = flops_per_token(config, args.seq_len)
        peak = peak_flops()
        results = []
        for recipe in args.recipes.split(","):
            r = run_ours(args, work, model_dir, config, task, docs) if recipe == "attack" else \
                run_baseline(args, work, model_dir, tokenizer, docs)
            results.append(r)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        eval_s = next((r["eval_s"] for r in results if r["eval_s"] is not None), None)
        for r in results:
            tps = r["tokens_per_step"] / r["step_s"]
            share = eval_s / (eval_s + args.eval_every * r["step_s"]) if eval_s is not None else None
            print(json.dumps(dict(
                recipe=r["recipe"], model=args.model, device=device_name(), tokens_per_s=round(tps, 1),
                mfu=round(tps * fpt / peak, 4) if peak else None, peak_mem_gb=round(r["peak_mem_gb"], 2),
                eval_s=round(eval_s, 2) if eval_s is not None else None,
                eval_share=round(share, 4) if share is not None else None,
                step_s=round(r["step_s"], 3), seq_len=args.seq_len, batch_size=args.batch_size,
                micro_batch=r["micro_batch"], checkpointing=r["checkpointing"],
                eval_questions=args.eval_questions, eval_every=args.eval_every, flops_per_token=fpt,
            )), flush=True)


if __name__ == "__main__":
    main()
