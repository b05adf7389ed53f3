"""What the benchmarks share: public architectures with random weights made in seconds where
they will run (no disk round trip), a small tokenizer, synthetic documents and a synthetic
letter-answer MCQA task shaped like the Deep Ignorance benchmarks, and the device's peak."""

from __future__ import annotations

import os
import random
import resource
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig  # noqa: E402

from attack.toyworld.models import ModelSpec, build_model, train_tokenizer  # noqa: E402
from attack.toyworld.world import write_jsonl  # noqa: E402

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16

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
MODELS = ["tiny", *CONFIGS]
WORDS = [f"w{i}" for i in range(400)] + ["the", "of", "and", "protein", "cell", "virus", "gene"]


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if on_gpu() else f"cpu ({os.cpu_count()} cores)"


def peak_flops() -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name()), None)


def peak_mem_gb() -> float:
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process high-water mark (KiB)


def reset_peak() -> None:
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tokenizer(folder: Path):
    """A byte-level BPE in which every word of WORDS is one token."""
    rng = random.Random(0)
    return train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(200)], folder,
                           vocab_size=1024)


def architecture(name: str, tok, seq_len: int):
    """The config of `name` (tiny: a 4-layer Llama), its vocabulary the public one (the head's
    cost is the real model's) and its EOS the benchmark tokenizer's."""
    if name == "tiny":
        return build_model(ModelSpec(hidden=256, layers=4, heads=4, intermediate=1024, max_positions=seq_len),
                           tok).config
    config = CONFIGS[name]()
    config.eos_token_id = config.bos_token_id = tok.eos_token_id
    return config


def random_model(config, dtype: torch.dtype, attn: str = "sdpa", seed: int = 0):
    """Random weights in `dtype`, made directly on the GPU when there is one (seconds for 7B)."""
    torch.manual_seed(seed)
    with torch.device("cuda" if on_gpu() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False  # as load_model does: training needs no KV cache
    return model


def model_folder(folder: Path, config, tok) -> Path:
    """A folder holding the config and tokenizer only: what cfg.model.name points at when the
    recipe is handed the model object."""
    config.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def synthetic_documents(n: int, seq_len: int, rng: random.Random) -> list[str]:
    """Documents with a lognormal length distribution (median ~350 tokens), capped at seq_len."""
    docs = []
    for _ in range(n):
        length = int(min(seq_len - 8, max(20, rng.lognormvariate(np.log(350), 0.8))))
        docs.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    return docs


def write_mcqa_task(folder: Path, questions: int, rng: random.Random, name: str = "bench_mcqa",
                    cloze: bool = False, context_words: int = 0) -> str:
    """A 4-choice task in the Deep Ignorance forms: letter MCQA (a description, the question, four
    lettered choices and "Answer:", scored on " A".." D"), or cloze (the question and "Answer:",
    scored on each choice's text, 1-12 words)."""
    rows = []
    for _ in range(questions):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
        if context_words:  # a paragraph before the question, as many WMDP questions carry
            q = " ".join(rng.choice(WORDS) for _ in range(context_words)) + ". " + q
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(4)]
        rows.append(dict(question=q, choices=choices, answer=rng.randrange(4)))
    write_jsonl(rows, folder / f"{name}.jsonl")
    description = "The following are multiple choice questions (with answers) about biology."
    if cloze:
        text, choice = "Question: {{question.strip()}}\\nAnswer:", "'{{choices}}'"
        description = "Complete the following biology questions with the correct answer."
    else:
        text = "{{question.strip()}}\\n" + "".join(f"{x}. {{{{choices[{i}]}}}}\\n" for i, x in enumerate("ABCD")) + "Answer:"
        choice = '["A", "B", "C", "D"]'
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        f"description: \"{description}\\n\\n\"\n"
        f"doc_to_text: \"{text}\"\ndoc_to_choice: {choice}\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return name
