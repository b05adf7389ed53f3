"""Tiny causal LMs for the toy world: a locally trained tokenizer, random-init configs,
pretraining on a corpus, and a post-hoc unlearning step. Saved as ordinary HF checkpoints."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

from attack.packing import pack_documents


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "llama"  # llama | gpt_neox
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 512


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf


def build_model(spec: ModelSpec, tokenizer, seed: int = 0):
    """A random-init tiny model of the given architecture."""
    from transformers import AutoModelForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=spec.max_positions,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if spec.arch == "llama":
        config = LlamaConfig(num_key_value_heads=spec.heads, **common)
    elif spec.arch == "gpt_neox":
        config = GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common)
    else:
        raise ValueError(f"unknown toy architecture {spec.arch}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def packed_batches(texts: list[str], tokenizer, seq_len: int, batch_size: int, rng: random.Random):
    """Endless shuffled batches of packed rows (reshuffled and repacked every epoch)."""
    while True:
        texts = list(texts)
        rng.shuffle(texts)
        packed = pack_documents(texts, tokenizer, seq_len)
        order = list(range(packed["input_ids"].shape[0]))
        if len(order) < batch_size:  # no batch at all: would loop forever
            raise ValueError(f"{len(texts)} documents pack into {len(order)} rows of {seq_len} tokens, "
                             f"fewer than one batch of {batch_size}")
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield {k: v[idx] for k, v in packed.items()}


def answer_batches(pairs: list[tuple[str, str]], tokenizer, batch_size: int, rng: random.Random):
    """Endless shuffled batches of prompt + " " + answer, with labels on the answer tokens only."""
    examples = []
    for prompt, answer in pairs:
        start = len(tokenizer(prompt)["input_ids"])
        examples.append((tokenizer(f"{prompt} {answer}")["input_ids"], start))
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (full, start) in enumerate(chunk):
                ids[r, : len(full)] = torch.tensor(full)
                labels[r, start : len(full)] = torch.tensor(full[start:])
                mask[r, : len(full)] = 1
            yield dict(input_ids=ids, labels=labels, attention_mask=mask)


def pretrain(model, tokenizer, texts: list[str], steps: int, lr: float = 3e-3, batch_size: int = 16,
             seq_len: int = 128, seed: int = 0, log: Callable[[str], None] = print):
    """Plain AdamW pretraining with warm-up and cosine decay (the model is tiny; no Trainer needed)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    batches = packed_batches(texts, tokenizer, seq_len, batch_size, rng)
    for step in range(1, steps + 1):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0:
            log(f"  pretrain step {step}/{steps} loss {loss.item():.3f}")
    return model


def _step_and_check(opt, params, loss, step: int, check_every: int, check, history: list, log, name: str,
                    forget_loss, retain_loss) -> bool:
    """One clipped optimizer step of an unlearning method; every `check_every` steps, its scores
    into `history` and the log. Returns whether the check says stop."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step % check_every:
        return False
    scores = check()
    history.append(dict(step=step, forget_loss=forget_loss.item(), retain_loss=retain_loss.item(), **scores))
    log(f"  {name} step {step}: forget loss {forget_loss.item():.2f} retain loss {retain_loss.item():.4f} "
        f"target {scores['target']:.2f} general {scores['general']:.2f}")
    return bool(scores["stop"])


def unlearn(model, forget_batches, retain_batches, check: Callable[[], dict], max_steps: int = 200,
            lr: float = 1e-4, retain_weight: float = 1.0, check_every: int = 10, max_forget_loss: float = 10.0,
            seed: int = 0, log: Callable[[str], None] = print):
    """Gradient difference: ascend the loss on forget batches, descend it on retain batches.

    Batches are dicts of model inputs with labels (packed documents, or questions whose labels
    cover only the answer). `check()` returns {"target": acc, "general": acc, "stop": bool};
    unlearning stops as soon as it says stop (target at chance while general stays high).
    """
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for step in range(1, max_steps + 1):
        model.train()
        forget_loss = model(**next(forget_batches)).loss
        retain_loss = model(**next(retain_batches)).loss
        # Bounded ascent: once the forget loss is far above chance there is nothing to gain.
        ascent = -torch.clamp(forget_loss, max=max_forget_loss)
        if _step_and_check(opt, list(model.parameters()), ascent + retain_weight * retain_loss, step, check_every, check,
                           history, log, "unlearn", forget_loss, retain_loss):
            break
    return model, history


def rmu(model, frozen, forget_batches, retain_batches, check: Callable[[], dict], layer: int, steer: float,
        max_steps: int = 300, lr: float = 1e-3, retain_weight: float = 1.0, check_every: int = 10, seed: int = 0,
        log: Callable[[str], None] = print):
    """Representation misdirection (RMU, Li et al. 2024): push the output of decoder layer `layer`
    on forget text toward a fixed random direction of norm `steer`, and keep it equal to the
    frozen model's on retain text. Only the MLPs of that layer and the two below it train.

    The knowledge stays in the later layers; the early ones learn to bury it under one large
    direction, which is why removing that direction brings it back (Lucki et al. 2024).
    `check()` as in `unlearn`."""
    torch.manual_seed(seed)
    layers = model.get_decoder().layers
    trained = [p for block in layers[max(0, layer - 2): layer + 1] for p in block.mlp.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    control = torch.rand(model.config.hidden_size, generator=g)
    control = steer * control / control.norm()

    def output_of(m, batch):
        seen = {}
        hook = m.get_decoder().layers[layer].register_forward_hook(
            lambda mod, args, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
        try:
            m(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"))
        finally:
            hook.remove()
        return seen["h"]

    opt = torch.optim.AdamW(trained, lr=lr)
    history = []
    for step in range(1, max_steps + 1):
        model.train()
        forget, retain = next(forget_batches), next(retain_batches)
        forget_loss = ((output_of(model, forget) - control) ** 2).mean()
        with torch.no_grad():
            kept = output_of(frozen, retain)
        retain_loss = ((output_of(model, retain) - kept) ** 2).mean()
        if _step_and_check(opt, trained, forget_loss + retain_weight * retain_loss, step, check_every, check,
                           history, log, "rmu", forget_loss, retain_loss):
            break
    for p in model.parameters():
        p.requires_grad_(True)
    return model, history
