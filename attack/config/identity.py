"""Run identity: the part of a config that decides the result, its hash and the default run id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from attack.config.kinds import AttackConfig
from attack.config.loading import to_dict


def identity(cfg: AttackConfig) -> dict:
    """The part of the config that decides the result (not where it is written or logged)."""
    return identity_of(to_dict(cfg))


def identity_of(d: dict) -> dict:
    """`identity` of a config as a plain dict (a run's config.yaml, of any version), changed in place."""
    d.pop("output", None)
    d.pop("logging", None)
    if isinstance(d.get("eval"), dict):
        d["eval"].pop("expect", None)  # a check of the result, not part of it
        d["eval"].pop("dataset_paths", None)  # where a copy of the data lives, not what it is
    return d


def config_hash(cfg: AttackConfig) -> str:
    """The run id's hash: what the attack is, seed included."""
    return _digest(identity(cfg), 10)


def setting_hash(d: dict) -> str:
    """The same identity without the seed (a run's config.yaml as a plain dict): the runs of one
    setting under several seeds share it (the report's `setting` column)."""
    d = identity_of(d)
    if isinstance(d.get("train"), dict):
        d["train"].pop("seed", None)
    return _digest(d, 10)


def _digest(obj, n: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def default_run_id(cfg: AttackConfig) -> str:
    label = Path(cfg.model.name.rstrip("/")).name or "model"
    if cfg.model.revision:
        label += f"@{cfg.model.revision}"
    safe = "".join(c if c.isalnum() or c in "-_.@" else "-" for c in label)
    return f"{safe}-{config_hash(cfg)}"


def dump_yaml(cfg: AttackConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
