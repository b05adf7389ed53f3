"""Attack procedures, one file per kind, each read top to bottom:

    finetune.py   supervised fine-tuning on an attack corpus (LoRA or full)
    ablation.py   directional ablation of one residual-stream direction, optionally then fine-tuning
    grpo.py       reinforcement learning (GRPO) with a reward on a split kept apart from the evaluation
    quantize.py   the weights rounded to a lower precision, no training
    incontext.py  retrieved passages and solved examples before each question, no weight change
    evaluate.py   no attack: the model scored as it is (a sweep's reference, a baseline)
    common.py     what they share: the setup before the attack, the Trainer pieces, the closing

Every recipe takes a validated config of its kind and writes the same run directory
(attack/rundir.py), so the report compares attacks of every kind on one step axis. A new kind
is a config module in attack/config/ and a recipe file here with `run(cfg, ...)`, named in RECIPES.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

# kind -> the module that runs it (an explicit table, as lm-eval keeps one: readers and tools follow it)
RECIPES: dict[str, str] = {
    "finetune": "attack.recipes.finetune",
    "ablation": "attack.recipes.ablation",
    "grpo": "attack.recipes.grpo",
    "quantize": "attack.recipes.quantize",
    "incontext": "attack.recipes.incontext",
    "evaluate": "attack.recipes.evaluate",
}


def run_attack(cfg, extra_callbacks: list | None = None, quiet: bool = False, cell: dict | None = None,
               progress: bool | None = None, model=None) -> Path:
    """Run the recipe of cfg.kind and return its run directory. `cell` (sweep metadata) goes to
    cell.json; `extra_callbacks` join the recipe's Trainer. `quiet`: no progress bar, no final
    table; `progress`: a line per evaluation point (default: when not quiet). `model`: the model
    under test already built (finetune only; a benchmark's random init, made in seconds on the
    GPU), instead of loading cfg.model.name, which still gives the tokenizer."""
    recipe = import_module(RECIPES[cfg.kind])  # imported on use: a kind's libraries (TRL, bitsandbytes) load only for it
    built = {} if model is None else {"model": model}
    return recipe.run(cfg, extra_callbacks=extra_callbacks, quiet=quiet, cell=cell, progress=progress, **built)
