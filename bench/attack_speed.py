"""Attack-step throughput, memory and evaluation cost: this tool's attacks vs the Deep Ignorance recipe.

    python bench/attack_speed.py                                   # CPU, tiny Llama
    python bench/attack_speed.py --model tiny --recipes attack,baseline,full
    python bench/attack_speed.py --model llama-3.2-1b --recipes attack,baseline,qlora,full   # GPU
    python bench/attack_speed.py --model pythia-6.9b --steps 3 --warmup 1

Prints one JSON line per recipe with keys
    recipe, model, device, tokens_per_s, mfu, peak_mem_gb, micro_batch, checkpointing, eval_s, ...

The model is the public architecture with random weights, made in seconds on the device and
handed to the recipe as an object (no disk round trip; only qlora loads from a folder, as
4-bit weights are quantised while they load). Recipes, same model, same process:
- `attack`: this tool's LoRA attack (r16, all linear layers) through `run_attack` itself:
  documents packed into full rows with per-document position ids (transformers builds the
  block-diagonal mask for sdpa/flex), bf16 autocast over a bf16 frozen base and fp32 adapters
  on GPU, micro-batch fitted to memory, gradient checkpointing only if needed, Liger's fused
  linear+CE where installed. `--attn` repeats it per attention implementation.
- `baseline`: the Deep Ignorance recipe: HF Trainer + PEFT, one document per row padded to
  seq_len, micro-batch 1 x 16 accumulation, gradient checkpointing on.
- `qlora`: the attack on a 4-bit NF4 base (bitsandbytes; GPU only).
- `full`: full fine-tuning through `run_attack` (fp32 master weights, bf16 autocast on GPU).

tokens_per_s counts trained (non-padding) tokens per second of training, evaluation excluded
(median optimizer step after --warmup steps). mfu = tokens_per_s x flops_per_token / peak with
flops_per_token = 6 N + 12 L d s (N non-embedding parameters, L layers, d hidden size, s
sequence length: the PaLM count, which charges a full backward to LoRA too, so figures compare
with the literature); peak 989 TFLOP/s dense bf16 on H100/H200; null on CPU.
eval_s: seconds per evaluation point of a synthetic --eval-questions letter MCQA task; the
attack rows evaluate through the tool's path (eval_callbacks/fastlm.py), the baseline row
through stock lm-eval (HFLM + evaluate) on its model. eval_share = eval_s / (eval_s +
eval_every x step time), the share of a run spent evaluating at that interval.
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

from random_models import (  # noqa: E402
    MODELS,
    architecture,
    device_name,
    model_folder,
    on_gpu,
    peak_flops,
    peak_mem_gb,
    random_model,
    reset_peak,
    synthetic_documents,
    tokenizer,
    write_mcqa_task,
)
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from attack.config import load_config  # noqa: E402
from attack.rundir import RunDir  # noqa: E402
from attack.toyworld.world import write_jsonl  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of optimizer steps after a warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], None

    def on_step_begin(self, args, state, control, **kw):
        if on_gpu():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if on_gpu():
            torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def flops_per_token(config, seq_len: int) -> float:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = AutoModelForCausalLM.from_config(config).named_parameters()
        n = sum(p.numel() for name, p in params if "embed" not in name and "lm_head" not in name)
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def run_tool(args, work: Path, recipe: str, attn: str, task: str, config, tok) -> dict:
    """One attack through run_attack: LoRA on a half-precision base (attack), LoRA on a 4-bit
    base loaded from a folder (qlora), or full fine-tuning with fp32 master weights (full)."""
    from attack.recipes import run_attack

    steps = args.warmup + args.steps
    half = torch.bfloat16 if on_gpu() else torch.float32
    folder = model_folder(work / f"model-{recipe}-{attn}", config, tok)
    model = None
    if recipe == "qlora":
        random_model(config, half).save_pretrained(str(folder))  # 4-bit weights quantise as they load
    else:
        model = random_model(config, torch.float32 if recipe == "full" else half, attn)
    cfg = load_config({
        "model": {"name": str(folder), "load_in_4bit": recipe == "qlora", "attn_implementation": attn},
        "adapter": {"kind": "full"} if recipe == "full" else {"rank": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(work / "docs.jsonl"), "seq_len": args.seq_len},
        "train": {"lr": 2e-5, "batch_size": args.batch_size, "max_steps": steps, "log_every": steps,
                  "save_every": 10 ** 9},
        "eval": {"tasks": [task], "include_path": [str(work)], "every": steps, "batch_size": args.eval_batch_size},
        "output": {"dir": str(work / "runs"), "run_id": f"{recipe}-{attn}"},
    })
    timer = StepTimer(args.warmup)
    reset_peak()
    run = run_attack(cfg, extra_callbacks=[timer], quiet=True, model=model)
    summary = RunDir(run).summary
    # The last point: its requests and tokens were built at step 0, as for every later point of a run
    return dict(recipe=recipe, attn=attn, step_s=float(np.median(timer.times)),
                tokens_per_step=args.batch_size * args.seq_len, eval_s=summary["eval_point_s"][-1],
                micro_batch=summary["micro_batch_size"], checkpointing=summary["gradient_checkpointing"],
                peak_mem_gb=peak_mem_gb())


class PaddedDocs(torch.utils.data.Dataset):
    """One document per row, right-padded to seq_len; padding is masked out of attention and loss."""

    def __init__(self, docs, tok, seq_len):
        enc = tok(docs, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return dict(input_ids=self.ids[i], attention_mask=self.mask[i], labels=labels)


def run_baseline(args, work: Path, task: str, config, tok, docs) -> dict:
    """The Deep Ignorance recipe's step; its evaluation point through stock lm-eval."""
    from attack.config import AdapterConfig
    from attack.model import apply_adapter
    from eval_callbacks import LiveEvaluator

    attn = args.attn.split(",")[0]
    model = random_model(config, torch.bfloat16 if on_gpu() else torch.float32, attn)
    model = apply_adapter(model, AdapterConfig(rank=16, alpha=32, dropout=0.0), gradient_checkpointing=True)
    data = PaddedDocs(docs, tok, args.seq_len)
    real_tokens = float(data.mask.float().sum(1).mean()) * 16
    targs = TrainingArguments(
        output_dir=str(work / "baseline"), max_steps=args.warmup + args.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=16, learning_rate=2e-5, bf16=on_gpu(),
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10 ** 9,
        use_cpu=not on_gpu(), remove_unused_columns=False, dataloader_drop_last=True,
    )
    timer = StepTimer(args.warmup)
    reset_peak()
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON lines only
    trainer.train()
    peak = peak_mem_gb()
    stock = LiveEvaluator(model, tok, [task], include_path=[str(work)], batch_size=args.eval_batch_size,
                          autocast_dtype=torch.bfloat16 if on_gpu() else None, fast=False)
    start = time.perf_counter()
    stock.evaluate()
    return dict(recipe="baseline", attn=attn, step_s=float(np.median(timer.times)),
                tokens_per_step=real_tokens, eval_s=time.perf_counter() - start, micro_batch=1, checkpointing=True,
                peak_mem_gb=peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=MODELS)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median taken)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on GPU, 512 on CPU")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-questions", type=int, default=1273)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--recipes", default="attack,baseline", help="comma-separated: attack, baseline, qlora, full")
    p.add_argument("--attn", default="sdpa", help="attention implementations of the attack rows, comma-separated "
                                                  "(sdpa, flex_attention, eager)")
    args = p.parse_args()
    recipes = args.recipes.split(",")
    unknown = set(recipes) - {"attack", "baseline", "qlora", "full"}
    if unknown or ("qlora" in recipes and not on_gpu()):
        p.error(f"recipes {sorted(unknown) or ['qlora']}: not one of attack, baseline, qlora, full (qlora needs a GPU)")
    args.seq_len = args.seq_len or (2048 if on_gpu() else 512)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not on_gpu():
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from attack.__main__ import quiet_libraries

    quiet_libraries()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = tokenizer(work / "tok")
        config = architecture(args.model, tok, args.seq_len)
        task = write_mcqa_task(work, args.eval_questions, rng)
        docs = synthetic_documents(max(64, 4 * args.batch_size * (args.warmup + args.steps)), args.seq_len, rng)
        write_jsonl([{"text": d} for d in docs], work / "docs.jsonl")
        fpt, peak = flops_per_token(config, args.seq_len), peak_flops()
        for recipe in recipes:
            for attn in args.attn.split(",") if recipe == "attack" else args.attn.split(",")[:1]:
                r = run_baseline(args, work, task, config, tok, docs) if recipe == "baseline" else \
                    run_tool(args, work, recipe, attn, task, config, tok)
                tps = r["tokens_per_step"] / r["step_s"]
                print(json.dumps(dict(
                    recipe=r["recipe"], model=args.model, device=device_name(), attn=r["attn"],
                    tokens_per_s=round(tps, 1), mfu=round(tps * fpt / peak, 4) if peak else None,
                    peak_mem_gb=round(r["peak_mem_gb"], 2), micro_batch=r["micro_batch"],
                    checkpointing=r["checkpointing"], eval_s=round(r["eval_s"], 2),
                    # 3 significant digits: a tiny share is not 0
                    eval_share=float(f"{r['eval_s'] / (r['eval_s'] + args.eval_every * r['step_s']):.3g}"),
                    step_s=round(r["step_s"], 3), seq_len=args.seq_len, batch_size=args.batch_size,
                    eval_questions=args.eval_questions, eval_every=args.eval_every, flops_per_token=fpt,
                )), flush=True)
                if on_gpu():
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
