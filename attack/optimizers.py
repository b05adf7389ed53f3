"""The optimizer an attack trains with (train.optimizer): what the Trainer is told to build, and
the record of it in every checkpoint.

Red teams sweep optimizers (TAR's suite: SGD with and without Nesterov, Adam, AdamW, Adagrad,
Adadelta, schedule-free AdamW): a safeguard tuned against AdamW can fall to another. Every one is
built by the Trainer (its weight-decay groups, its resume of optimizer.pt); torch's own classes
where torch has them, the schedulefree package's for schedule_free_adamw (through the Trainer's
own name), and Muon (torch.optim.Muon) on every matrix with AdamW on the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attack.checkpoints import OPTIMIZER_RECORD
from attack.files import write_atomic


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon's orthogonalised update on every 2-D weight (LoRA's A and B, a full model's matrices),
    AdamW on the rest (norms, biases), which Muon does not define. The learning rate is matched
    to AdamW's update size (torch's match_rms_adamw), so one lr means the same for both."""

    def __init__(self, params, lr: float, momentum: float = 0.95, **adamw):
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        matrices = [g for g in ({**g, "params": [p for p in g["params"] if p.ndim == 2]} for g in groups) if g["params"]]
        rest = [g for g in ({**g, "params": [p for p in g["params"] if p.ndim != 2]} for g in groups) if g["params"]]
        self.parts = {}  # the inner optimizers, by name; either may be absent
        if matrices:
            self.parts["muon"] = torch.optim.Muon(matrices, lr=lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        if rest:
            self.parts["adamw"] = torch.optim.AdamW(rest, lr=lr, **adamw)
        super().__init__([p for o in self.parts.values() for g in o.param_groups for p in g["params"]], {"lr": lr})
        # The scheduler sets lr on these groups: the inner optimizers' own
        self.param_groups = [g for o in self.parts.values() for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for inner in self.parts.values():
            inner.step()
        return loss

    def state_dict(self):
        return {name: inner.state_dict() for name, inner in self.parts.items()}

    def load_state_dict(self, state_dict):
        for name, inner in self.parts.items():
            inner.load_state_dict(state_dict[name])


def trainer_optimizer(train) -> tuple[dict, dict]:
    """(TrainingArguments fields, Trainer keyword arguments) that make the Trainer build
    train.optimizer at train.lr (weight decay as the Trainer groups it)."""
    name, lr = train.optimizer, train.lr
    if name == "adamw":
        return {}, {}  # the Trainer's default: torch's (fused) AdamW
    if name == "schedule_free_adamw":
        return {"optim": "schedule_free_adamw"}, {}
    built = {
        "adam": (torch.optim.Adam, {}),
        "sgd": (torch.optim.SGD, {"momentum": train.momentum}),
        "sgd_nesterov": (torch.optim.SGD, {"momentum": train.momentum, "nesterov": True}),
        "adagrad": (torch.optim.Adagrad, {}),
        "adadelta": (torch.optim.Adadelta, {}),
        "muon": (MuonWithAdamW, {"momentum": train.momentum}),
    }
    cls, kwargs = built[name]
    return {}, {"optimizer_cls_and_kwargs": (cls, {"lr": lr, **kwargs})}


def describe(optimizer) -> dict:
    """What was built: the class (schedulefree's, torch's or this module's) and its settings."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    cls = type(inner)
    if isinstance(inner, MuonWithAdamW):
        defaults = {name: _settings(part) for name, part in inner.parts.items()}
    else:
        defaults = _settings(inner)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "defaults": defaults}


def _settings(optimizer) -> dict:
    """An optimizer's plain-valued defaults (lr, betas, momentum, ...)."""
    return {k: v for k, v in getattr(optimizer, "defaults", {}).items() if isinstance(v, (int, float, bool, str, tuple))}


class RecordOptimizer:
    """A part of every checkpoint (attack/checkpoints.py): which optimizer its optimizer.pt is the
    state of (train.optimizer, its class and settings)."""

    def __init__(self, name: str):
        self.name = name

    def save(self, ckpt: Path, state, optimizer=None) -> None:
        if state.is_world_process_zero and optimizer is not None:
            write_atomic(ckpt / OPTIMIZER_RECORD, json.dumps({"optimizer": self.name, **describe(optimizer)}, indent=1, default=str) + "\n")
