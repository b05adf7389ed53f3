"""Resumable checkpoints: where they live, when they are saved, the seal that makes one
trustworthy, and the search for the newest one a resume may use.

    checkpoints/checkpoint-<step>/   the Trainer's files (weights, optimizer.pt, scheduler.pt,
                                     rng_state*.pth, trainer_state.json), the parts a recipe adds
                                     (rows_trained.npy, optimizer.json), manifest.json written last

A checkpoint is whole only when its manifest (every file's size and SHA-256, and the identity
of the run that wrote it) verifies, every file a checkpoint must have is named in it, and its
states agree with its step. The manifest is never trusted to say what must be there: a resume
from a checkpoint missing its optimizer or RNG state would be a different attack, silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from attack.errors import first_line
from attack.files import read_json, sha256_file, write_atomic

# The files of a checkpoint folder, named here only.
TRAINER_STATE = "trainer_state.json"  # transformers' own
OPTIMIZER_STATE = "optimizer.pt"  # transformers' own
SCHEDULER_STATE = "scheduler.pt"  # transformers' own
MANIFEST = "manifest.json"  # {"run": identity, "files": {name: {size, sha256}}}, written last
SEALED = "sealed.jsonl"  # beside the checkpoints folder: {"step", "manifest": sha256} of each seal, the run's own record
ROWS_TRAINED = "rows_trained.npy"  # the packed rows trained so far (attack/data.py RowsTrained)
OPTIMIZER_RECORD = "optimizer.json"  # which optimizer optimizer.pt is the state of (attack/optimizers.py)
TRAINER_FILES = (TRAINER_STATE, OPTIMIZER_STATE, SCHEDULER_STATE)  # what every Trainer checkpoint holds


def required_parts(uses_data: bool) -> tuple[str, ...]:
    """The files the recipes add to every checkpoint, without which a resume would not be the same
    attack: the optimizer's record, and the rows trained where a corpus is read."""
    return (OPTIMIZER_RECORD, *((ROWS_TRAINED,) if uses_data else ()))


def checkpoint_dir(output: str | Path, step: int) -> Path:
    """The checkpoint of `step` in a checkpoints folder (the Trainer's output_dir), as the Trainer names it."""
    return Path(output) / f"checkpoint-{step}"


def checkpoint_step(path) -> int:
    """The step of a checkpoint folder, checkpoint-<step>."""
    return int(str(path).rsplit("-", 1)[-1])


def is_checkpoint(path: Path, prefix: str = "") -> bool:
    """A checkpoint folder, checkpoint-<step> (with `prefix`: one set aside, damaged-checkpoint-<step>);
    anything else there (a checkpoint-3.bak a user made) is left alone."""
    return path.is_dir() and re.fullmatch(re.escape(prefix) + r"checkpoint-\d+", path.name) is not None


def seal(ckpt: Path, run: dict) -> None:
    """Write the checkpoint's manifest, last and atomically, with `run` (the identity of the run
    that wrote it). Hashing reads the checkpoint once (seconds for an adapter; for a full 7B
    model with its optimizer, about a minute per checkpoint at disk speed)."""
    ckpt = Path(ckpt)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    manifest = {str(p.relative_to(ckpt)): dict(size=p.stat().st_size, sha256=sha256_file(p)) for p in files}
    write_atomic(ckpt / MANIFEST, json.dumps({"run": run, "files": manifest}, indent=1))


def record_seal(ckpt: Path) -> None:
    """Append the digest of the checkpoint's manifest to the run's record of its seals, outside the
    checkpoint: a manifest cannot vouch for itself (another run's checkpoint with its identity
    edited and its files rehashed agrees with its own manifest), the run's record can."""
    ckpt = Path(ckpt)
    with open(ckpt.parent.parent / SEALED, "a") as f:
        f.write(json.dumps({"step": checkpoint_step(ckpt), "manifest": sha256_file(ckpt / MANIFEST)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _sealed_here(ckpt: Path) -> str | None:
    """The manifest digest the run recorded for this checkpoint's step (its last seal of it)."""
    record, found = Path(ckpt).parent.parent / SEALED, None
    if record.is_file():
        for line in record.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(r, dict) and r.get("step") == checkpoint_step(ckpt):
                found = r.get("manifest")
    return found


def checkpoint_damage(ckpt: Path, run: dict | None = None, required: tuple[str, ...] = ()) -> str | None:
    """What makes a checkpoint unusable, or None when it proves itself whole: not a link to a
    folder elsewhere; a manifest of this run (`run`, when given) that names every file a
    checkpoint must have (the Trainer's and `required`), each there with its size and SHA-256,
    and is the very manifest the run recorded when it sealed that step (SEALED); a trainer state
    and an optimizer state of the checkpoint's own step; weights that read."""
    if ckpt.is_symlink():
        return "it is a link to another folder, not this run's own checkpoint"
    if not ckpt.is_dir():
        return "it is a file, not a checkpoint folder"
    manifest = read_json(ckpt / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return f"no valid {MANIFEST}: the save did not finish"
    files = manifest["files"]
    if run is not None and manifest.get("run") != run:
        return f"it was written by another run ({manifest.get('run')!r})"
    for name in (*TRAINER_FILES, *required):
        if name not in files:
            return f"{name} is not in it"
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", n) for n in files):
        return "no RNG state in it"
    for name, want in files.items():
        f = ckpt / name
        if not isinstance(want, dict) or not f.is_file() or f.is_symlink():
            return f"{name} is missing"
        if f.stat().st_size != want.get("size") or sha256_file(f) != want.get("sha256"):
            return f"{name} is not the file that was saved (size or SHA-256 differs)"
    state = read_json(ckpt / TRAINER_STATE)
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(ckpt):
        return f"{TRAINER_STATE} is unreadable or of another step"
    if run is not None and _sealed_here(ckpt) != sha256_file(ckpt / MANIFEST):
        return (f"it is not the checkpoint this run sealed at step {checkpoint_step(ckpt)} (its {MANIFEST} is not the "
                f"one recorded in {SEALED})")
    return _weights_damage(ckpt) or _states_damage(ckpt)


def _weights_damage(ckpt: Path) -> str | None:
    from safetensors import safe_open

    weights = list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin"))
    if not weights:
        return "no weight files"
    for f in weights:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt") as st:  # the header covers the whole file; every tensor reads
                    for key in st.keys():
                        st.get_slice(key)
            except Exception as e:  # safetensors raises its own error types
                return f"{f.name} is unreadable: {first_line(e)}"
        elif not zipfile.is_zipfile(f):
            return f"{f.name} is truncated"
    return None


def _states_damage(ckpt: Path) -> str | None:
    """The optimizer, scheduler and RNG states load as plain tensors (no pickled code), and the
    optimizer's own step count is the checkpoint's (a state copied from another checkpoint is not)."""
    from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state, as the Trainer allows it

    for f in sorted(ckpt.glob("*.pt")) + sorted(ckpt.glob("*.pth")):
        try:
            with safe_globals():
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # unpickling raises many types; any of them means it cannot resume
            return f"{f.name} does not load ({first_line(e)})"
        if f.name == "optimizer.pt":
            steps = {int(s["step"]) for s in (state.get("state") or {}).values()
                     if isinstance(s, dict) and isinstance(s.get("step"), torch.Tensor | int | float)}
            if steps and steps != {checkpoint_step(ckpt)}:
                return f"optimizer.pt holds the state of step {sorted(steps)[0]}, not {checkpoint_step(ckpt)}"
    for f in sorted(ckpt.glob("*.npy")):
        try:
            np.load(f, allow_pickle=False)
        except (ValueError, OSError) as e:
            return f"{f.name} does not load as a plain array ({first_line(e)})"
    return None


def newest_valid(folder: Path, keep: int = 2, run: dict | None = None, required: tuple[str, ...] = (),
                 usable=lambda step: True, say=lambda m: print(m, file=sys.stderr)) -> str | None:
    """The newest checkpoint in `folder` that proves itself whole (`checkpoint_damage`) and is
    `usable` (the caller's own check of its step, e.g. that the curve holds every point up to it).
    A newer damaged one is set aside as damaged-checkpoint-N, said in one line, and the next
    older one is tried; of the set-aside folders the newest `keep` are kept, the rest deleted."""
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():  # a file (or a dead link) in its place
        aside = folder.with_name(f"damaged-{folder.name}")
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        elif aside.exists() or aside.is_symlink():
            aside.unlink()
        os.replace(folder, aside)
        say(f"{folder} is not a folder; set aside as {aside.name}, starting the checkpoints again")
        return None
    if not folder.is_dir():
        return None
    found = None
    # anything named like a checkpoint, folder or not: a plain file or a dead link of that name
    # would be in the way of the next save, so it is set aside like any damaged checkpoint
    candidates = sorted((p for p in folder.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)), key=checkpoint_step,
                        reverse=True)
    for ckpt in candidates:
        problem = checkpoint_damage(ckpt, run, required)
        if problem is None and usable(checkpoint_step(ckpt)):
            found = str(ckpt)
            break
        if problem is None:
            continue  # whole, but the run's own records of it are gone: an older one is tried
        aside = ckpt.with_name(f"damaged-{ckpt.name}")
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
        os.replace(ckpt, aside)
        say(f"checkpoint {ckpt.name} is damaged ({problem}); set aside as {aside.name}, resuming from an older one")
    damaged = sorted((p for p in folder.iterdir() if is_checkpoint(p, "damaged-")), key=checkpoint_step, reverse=True)
    for old in damaged[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return found


class Checkpointing(TrainerCallback):
    """Saving, in one callback: a checkpoint at every evaluation point (or every train.save_every
    steps, which the Trainer's own schedule does), the recipe's `parts` written into it
    (each an object with `save(ckpt, state, optimizer)`, called on every process: a part may
    gather), then the seal, once every process has written its share. The order is this code's,
    not the order callbacks happen to be registered in."""

    def __init__(self, schedule: list[int] | None, run: dict, parts: list = ()):
        self.points = set(schedule or ())
        self.run, self.parts = run, list(parts)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.points:
            control.should_save = True

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        for part in self.parts:
            part.save(ckpt, state, optimizer)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            seal(ckpt, self.run)
            record_seal(ckpt)
