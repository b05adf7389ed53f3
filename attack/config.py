"""The attack's configuration: one schema of frozen dataclasses, loaded from YAML and
overridden by CLI flags. Unknown keys and wrong types are rejected with one clear line.

Every field has a docstring-style comment; `python -m attack --help` lists the flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from attack.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""
    """Model under test: a hub id (EleutherAI/deep-ignorance-unfiltered), a local directory, or a
    local .gguf file (dequantised to full precision on load)."""
    gguf_file: str | None = None
    """A GGUF file inside the hub repository or folder named by `name`, e.g. model-Q8_0.gguf."""
    revision: str | None = None
    """Hub revision (branch, tag or commit), e.g. global_step119209. Ignored for local directories."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the source."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of forward/backward. auto: bf16 on GPUs that support it, fp32 on CPU.
    Trainable weights (LoRA adapters, or full-fine-tune master weights) always stay fp32."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit nf4 (bitsandbytes, CUDA only)."""
    attn_implementation: str | None = None
    """sdpa, flex_attention, flash_attention_2, eager; None lets transformers choose."""


@dataclass(frozen=True)
class AdapterConfig:
    kind: Literal["lora", "full"] = "lora"
    """lora: train a PEFT LoRA adapter on a frozen base. full: train every weight."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer except the output head."""


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    """Attack corpus: a local jsonl/json/parquet/csv/txt file or folder, or a hub dataset id."""
    name: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Dataset split to train on."""
    text_field: str = "text"
    """Column holding the document text (ignored when `template` is set)."""
    template: str | None = None
    """Python format string over several columns, e.g. "{question}\\n{answer}"."""
    seq_len: int = 2048
    """Length of each packed training row, in tokens."""
    token_budget: int | None = None
    """Stop after this many training tokens (overrides train.max_steps)."""
    cache_dir: str = ".cache/corpus"
    """Where prepared (tokenized, packed) corpora are kept, one folder per corpus x tokenizer x
    seq_len; every later cell and rank reuses them. Put it on shared storage for clusters."""
    num_proc: int | None = None
    """Tokenizer worker processes for corpus preparation; None: up to 8, as cores allow."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-5
    """Peak learning rate."""
    lr_scheduler: str = "constant_with_warmup"
    """transformers scheduler name. Constant keeps every prefix of the recovery curve a valid
    shorter attack; a decaying schedule ties the curve's shape to max_steps."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    batch_size: int = 16
    """Rows (of seq_len tokens) per optimizer step, across all devices."""
    micro_batch_size: int | None = None
    """Rows per forward pass per device; None: the whole batch (accumulation fills the rest)."""
    max_steps: int = 500
    """Optimizer steps of the attack."""
    seed: int = 0
    """Seed of the data order, dropout and LoRA init."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward to save memory (slower). None: only on a GPU where
    not even one row fits without it."""
    log_every: int = 10
    """Log training loss and learning rate every N steps."""
    save_every: int | None = None
    """Save a resumable checkpoint every N steps; None: at every evaluation interval."""


@dataclass(frozen=True)
class EvalConfig:
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (stock tasks or YAML tasks found under include_path)."""
    include_path: list[str] = field(default_factory=list)
    """Folders with extra lm-eval task YAML files."""
    every: int = 50
    """Evaluate every N steps (linear schedule). Step 0 and the last step are always evaluated."""
    schedule: Literal["linear", "log"] = "linear"
    """linear: every N steps. log: log_points log-spaced steps (dense early, where recovery is fast)."""
    log_points: int = 12
    """Number of log-spaced evaluation steps for schedule=log."""
    limit: int | None = None
    """Evaluate a fixed random subset of this many questions per task at intermediate points;
    the first and last points always use the full task."""
    batch_size: int = 32
    """lm-eval batch size."""
    dataset_paths: dict[str, str] = field(default_factory=dict)
    """Local copies of the hub datasets that tasks name: {hub id: folder laid out like the hub
    repository (same configurations and splits)}, e.g. {EleutherAI/wmdp_bio_robust_mcqa:
    /data/wmdp_bio_robust_mcqa}. The task YAMLs stay unchanged; ids not listed load from the hub."""
    expect: dict[str, float] = field(default_factory=dict)
    """Published pre-attack scores to check the step-0 point against, {task: value} on the task's
    headline metric, as a fraction (0.4297) or in percent (42.97)."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    """Folder that holds run directories."""
    run_id: str | None = None
    """Run directory name; None: derived from the resolved config (same config, same id)."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep."""


@dataclass(frozen=True)
class LoggingConfig:
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    """Experiment tracker; wandb honours WANDB_MODE=offline."""
    project: str = "finetune-attack"
    """wandb project name."""


@dataclass(frozen=True)
class AttackConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --- building from plain dicts (YAML) with strict checking -----------------------------


def _check_value(value, tp, where: str):
    """Return value coerced to type tp, or raise UserError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0])
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is dict:
        if isinstance(value, str):  # "k=v,k2=v2" from the command line
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise UserError(f"{where} expects KEY=VALUE[,KEY=VALUE], got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return {_check_value(k, args[0], where): _check_value(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):  # "a,b" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise UserError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where} must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    raise TypeError(f"unsupported config type {tp} at {where}")


def build(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            prefix = f"{where}." if where else ""
            raise UserError(
                f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(names)}"
            )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _check_value(data[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge override into base (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise UserError(f"cannot set '{dotted}': '{key}' is not a section")
    d[keys[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(data: dict) -> AttackConfig:
    """Build and validate an AttackConfig from a (merged) dict."""
    cfg = build(AttackConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: AttackConfig) -> None:
    """Checks that need no files or network: ranges and required fields."""
    if not cfg.model.name:
        raise UserError("no model given: pass --model <hub-id or local dir> or set model.name")
    if not cfg.data.path:
        raise UserError("no attack data given: pass --data <file, folder or hub id> or set data.path")
    if not cfg.eval.tasks:
        raise UserError("no evaluation tasks given: pass --eval-tasks task1,task2 or set eval.tasks")
    positive = {
        "eval.every": cfg.eval.every,
        "train.max_steps": cfg.train.max_steps,
        "train.batch_size": cfg.train.batch_size,
        "train.log_every": cfg.train.log_every,
        "data.seq_len": cfg.data.seq_len,
        "adapter.rank": cfg.adapter.rank,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.log_points": cfg.eval.log_points,
    }
    for optional in ("train.save_every", "train.micro_batch_size", "data.token_budget", "eval.limit"):
        section, key = optional.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            positive[optional] = value
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be > 0, got {value}")
    if cfg.train.lr <= 0:
        raise UserError(f"train.lr must be > 0, got {cfg.train.lr}")
    if not 0 <= cfg.adapter.dropout < 1:
        raise UserError(f"adapter.dropout must be in [0, 1), got {cfg.adapter.dropout}")
    mb = cfg.train.micro_batch_size
    if mb is not None and cfg.train.batch_size % mb:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"train.micro_batch_size ({mb})"
        )
    if cfg.model.load_in_4bit and cfg.adapter.kind == "full":
        raise UserError("4-bit loading is for LoRA (QLoRA); full fine-tuning needs real weights")


def check_dataset_copies(cfg: EvalConfig) -> None:
    """Every local copy named in eval.dataset_paths is a folder (checked before anything loads)."""
    for hub_id, folder in cfg.dataset_paths.items():
        if not Path(folder).expanduser().is_dir():
            raise UserError(f"eval.dataset_paths: the local copy of {hub_id} is not a folder: {folder}")


def identity(cfg: AttackConfig) -> dict:
    """The part of the config that decides the result (not where it is written or logged)."""
    d = to_dict(cfg)
    d.pop("output")
    d.pop("logging")
    d["eval"].pop("expect")  # a check of the result, not part of it
    d["eval"].pop("dataset_paths")  # where a copy of the data lives, not what it is
    return d


def config_hash(cfg: AttackConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def default_run_id(cfg: AttackConfig) -> str:
    label = Path(cfg.model.name.rstrip("/")).name or "model"
    if cfg.model.revision:
        label += f"@{cfg.model.revision}"
    safe = "".join(c if c.isalnum() or c in "-_.@" else "-" for c in label)
    return f"{safe}-{config_hash(cfg)}"


def steps_for(cfg: AttackConfig) -> int:
    """Optimizer steps of the attack: from the token budget when one is set."""
    if cfg.data.token_budget is not None:
        per_step = cfg.train.batch_size * cfg.data.seq_len
        return max(1, -(-cfg.data.token_budget // per_step))
    return cfg.train.max_steps


def dump_yaml(cfg: AttackConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
