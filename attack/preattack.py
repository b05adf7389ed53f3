"""The step-0 point shared by the cells of a sweep or search on the same model: the model under
test is scored once before its attacks, not once per cell.

Step 0 of a recovery curve is the model as loaded, before the attack touches it (a LoRA adapter
starts at zero, an edit comes after it, a fine-tune's first update too), so every attack on the
same model with the same evaluation scores the same numbers there. On a real benchmark that point
costs minutes per cell. The first cell to score it keeps its curve rows and per-question records
in <output.dir>/.pre-attack/<key>.json; the others read them back (attack/recipes/common.py).
The KL guard's reference (the model under test's next-token log-probabilities on eval.kl_task's
prompts) is kept beside it under the same key, <key>.kl.pt, by the first evaluator to compute it.

The key is everything that decides those numbers: the model section, the sizes and times of a
local model's files (a model rebuilt in place is scored again), the precision it runs in (the
live model's dtype and the autocast), the evaluation settings that change scores (not its
schedule, roles or expected scores), the contents of the task folders, and the versions of the
libraries that score. A caller that hands over a model it built itself shares nothing.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from attack.config import to_dict
from attack.evaluation import requested
from attack.files import model_files

# eval settings that decide when points are taken or how they are read, not what step 0 scores
NOT_SCORES = ("every", "schedule", "log_points", "expect", "roles")
LIBRARIES = ("torch", "transformers", "lm_eval", "peft")


def pre_attack_file(cfg, model, amp) -> Path:
    """Where this config's step-0 point is kept (and found, when another attack scored it)."""
    scoring = {k: v for k, v in to_dict(cfg.eval).items() if k not in NOT_SCORES}
    parameter = next(model.parameters())
    key = dict(model=to_dict(cfg.model), files=model_files(cfg.model.name), dtype=str(parameter.dtype),
               device=parameter.device.type, autocast=str(amp), eval=scoring,
               tasks=_contents([Path(p) for p in requested(cfg.eval)[1]]), libraries=_versions())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.output.dir) / ".pre-attack" / f"{digest}.json"


def _contents(folders: list[Path]) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if f.is_file() and "__pycache__" not in f.parts:
                digest.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
