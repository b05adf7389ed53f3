"""Choices that make an attack step fast without changing what it computes.

- micro-batch size: the largest divisor of the per-device batch whose forward+backward fits in
  GPU memory (gradient accumulation fills the rest, so the optimizer step is the same);
- gradient checkpointing: only when not even one row fits without it;
- Liger's fused linear + cross-entropy, where installed on a GPU (never materialises the
  full logits tensor; same loss up to float rounding), scoped to the attack's model: Liger
  rewrites the architecture's modeling module (functions, classes, class methods), which every
  model of that architecture built later in the process would run otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch

from attack.config import TrainConfig
from attack.errors import UserError


def liger_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


@contextlib.contextmanager
def kernels_scoped_to(model):
    """Whatever a kernel patch (Liger, applied by the Trainer) changes in the modeling module of
    `model`'s architecture, and in that module's classes, is put back when the block ends: the
    attacked model keeps its patched instance, and a model built later in the same process (a
    reference, a judge, a CPU model) runs stock transformers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(base).__module__]
    saved = dict(vars(module))
    classes = {name: dict(vars(obj)) for name, obj in saved.items()
               if isinstance(obj, type) and obj.__module__ == module.__name__}
    try:
        yield
    finally:
        for name in set(vars(module)) - set(saved):
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for name, attributes in classes.items():
            cls = saved[name]
            for key in set(vars(cls)) - set(attributes):
                delattr(cls, key)
            for key, value in attributes.items():
                if vars(cls).get(key) is not value and key not in ("__dict__", "__weakref__"):
                    setattr(cls, key, value)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _fits(model, rows: int, seq_len: int, vocab: int, amp: torch.dtype | None) -> bool:
    device = next(p for p in model.parameters()).device
    ids = torch.randint(0, vocab, (rows, seq_len), device=device)
    try:
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return ok


def choose_micro_batch(per_device: int, fits, checkpointing: bool | None) -> tuple[int, bool]:
    """The largest divisor of per_device for which fits(rows, checkpointing) holds, preferring
    no checkpointing when the choice is left open (None). Falls back to (1, True)."""
    options = [False, True] if checkpointing is None else [checkpointing]
    for ckpt in options:
        for mb in _divisors_desc(per_device):
            if fits(mb, ckpt):
                return mb, ckpt
    return 1, True


def fit_micro_batch(model, per_device: int, seq_len: int, vocab: int, amp: torch.dtype | None,
                    checkpointing: bool | None, headroom: float = 0.9) -> tuple[int, bool]:
    """(micro_batch, gradient_checkpointing) for this GPU. On CPU: the whole batch, no checkpointing.

    Trial steps run at a memory cap of `headroom` x the card, leaving room for optimizer state
    growth and evaluation.
    """
    if not torch.cuda.is_available():
        return per_device, bool(checkpointing)
    if next(model.parameters()).device.type != "cuda":
        model.to("cuda")

    def fits(rows: int, ckpt: bool) -> bool:
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        return _fits(model, rows, seq_len, vocab, amp)

    torch.cuda.set_per_process_memory_fraction(headroom)
    try:
        return choose_micro_batch(per_device, fits, checkpointing)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def per_device_batch(cfg: TrainConfig, processes: int) -> int:
    """Rows per optimizer step on each process; the batch must split evenly across them."""
    if cfg.batch_size % processes:
        raise UserError(f"train.batch_size ({cfg.batch_size}) must be a multiple of the {processes} processes")
    per_device = cfg.batch_size // processes
    if cfg.micro_batch_size and per_device % cfg.micro_batch_size:
        raise UserError(f"train.batch_size ({cfg.batch_size}) must be a multiple of "
                        f"micro_batch_size x processes ({cfg.micro_batch_size} x {processes})")
    return per_device


def micro_batch(cfg: TrainConfig, model, per_device: int, seq_len: int, vocab: int,
                amp: torch.dtype | None) -> tuple[int, bool]:
    """(micro-batch, gradient checkpointing): as configured, or fitted to this GPU."""
    if cfg.micro_batch_size:
        return cfg.micro_batch_size, bool(cfg.gradient_checkpointing)
    return fit_micro_batch(model, per_device, seq_len, vocab, amp, cfg.gradient_checkpointing)
