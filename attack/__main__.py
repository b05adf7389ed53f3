"""Command line.

    python -m attack --model M --data D --eval-tasks T ...   one attack
    python -m attack --config configs/attack/lora.yaml --lr 5e-5
    python -m attack sweep configs/sweeps/toy.yaml [--shard i/n] [--dry-run]
    python -m attack search configs/sweeps/search.yaml [--storage URL] [--dry-run]
    python -m attack report runs/ [--out DIR] [--x steps|tokens]
    python -m attack attribute RUN_DIR                       documents behind the recovery (--attribution runs)
    python -m attack counterfactual RUN_DIR --task T --k 10  rerun without the top-k documents vs k random
    python -m attack demo                                    the toy world, end to end
    python -m attack example own_model --copy my_attack      a shipped example to make your own
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import types
import typing
from importlib import import_module

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from attack import signals
from attack.errors import ArgumentParser, UserError, did_you_mean
from attack.signals import Terminated

# python -m attack <subcommand>: the module whose main(argv) runs it, and what it does.
SUBCOMMANDS = {
    "sweep": ("attack.sweep", "run a sweep of attack cells (models x attacks x seeds)"),
    "search": ("attack.search", "search the attack space per model (Optuna), chosen on selection tasks"),
    "report": ("attack.report", "recovery curves, tables and the worst case from run directories"),
    "attribute": ("attack.attribution.attribute", "which attack documents drove the recovery (--attribution runs)"),
    "counterfactual": ("attack.counterfactual", "rerun without the top-k attributed documents vs k random"),
    "demo": ("attack.toyworld.demo", "the built-in toy world, end to end"),
    "example": ("attack.examples", "the shipped examples (own_model: your model, corpus and task); --copy to edit"),
}

# Established short names; every key also has its long flag --<section>-<field>.
SHORT_FLAGS = {
    "model.name": "--model", "model.revision": "--revision", "model.trust_remote_code": "--trust-remote-code",
    "model.precision": "--precision", "model.load_in_4bit": "--load-in-4bit",
    "model.attn_implementation": "--attn-implementation",
    "adapter.rank": "--lora-rank", "adapter.alpha": "--lora-alpha", "adapter.dropout": "--lora-dropout",
    "adapter.target_modules": "--target-modules",
    "data.path": "--data", "data.text_field": "--text-field", "data.template": "--template",
    "data.seq_len": "--seq-len", "data.token_budget": "--token-budget", "data.cache_dir": "--data-cache",
    "train.lr": "--lr", "train.lr_scheduler": "--lr-scheduler", "train.warmup_steps": "--warmup-steps",
    "train.batch_size": "--batch-size", "train.micro_batch_size": "--micro-batch-size",
    "train.max_steps": "--max-steps", "train.seed": "--seed",
    "train.gradient_checkpointing": "--gradient-checkpointing", "train.log_every": "--log-every",
    "train.save_every": "--save-every",
    "eval.include_path": "--eval-include", "eval.dataset_paths": "--eval-dataset", "eval.expect": "--expect",
    "output.dir": "--output", "output.run_id": "--run-id", "output.resume": "--resume",
    "logging.report_to": "--report-to", "attribution.enabled": "--attribution",
}


def config_fields() -> dict[str, FieldInfo]:
    """Every settable key of every kind's config, dotted (model.name, train.lr, ...)."""
    from attack.config import KINDS

    out = {}
    for schema in KINDS.values():
        for section, info in schema.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                for name, field in info.annotation.model_fields.items():
                    out.setdefault(f"{section}.{name}", field)
    return out


def attack_parser() -> argparse.ArgumentParser:
    from attack.config import KINDS

    p = ArgumentParser(
        prog="python -m attack",
        usage="python -m attack [--config FILE] [--kind KIND] [--model M --data D --eval-tasks T ...] "
        "[--set KEY=VALUE]",
        description="Attack a checkpoint and measure recovery on held-out benchmarks while it runs. "
        "Values given here override the --config file;\nlists are comma-separated, mappings KEY=VALUE,KEY=VALUE.",
        epilog="subcommands (python -m attack <subcommand> --help):\n"
        + "\n".join(f"  {name:<15} {what}" for name, (_, what) in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file, or a shipped one by name (lora, full, ablation, grpo, own_model); "
                   "flags override it")
    p.add_argument("--kind", choices=list(KINDS), default=None, help="attack family (default: finetune)")
    groups = {}
    for key, field in config_fields().items():
        section = key.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} section")
        flags = [f"--{key.replace('.', '-').replace('_', '-')}"]
        if key in SHORT_FLAGS:
            flags.insert(0, SHORT_FLAGS[key])
        text = " ".join((field.description or "").split()).replace("%", "%%")
        help_ = f"{text} (default: {_shown(field.default)})"
        if _is_bool(field.annotation):  # --flag / --no-flag, under its shortest name only
            groups[section].add_argument(flags[0], dest=key, action=argparse.BooleanOptionalAction,
                                         default=None, help=help_)
        else:
            groups[section].add_argument(*flags, dest=key, default=None, metavar=_metavar(field.annotation),
                                         help=help_)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (adapter.kind=full)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. train.weight_decay=0.1")
    p.add_argument("--dry-run", action="store_true", help="check the config, task names, the model's location and "
                   "local paths offline, say what would run and where; train nothing")
    return p


def config_from_args(args: argparse.Namespace):
    from pathlib import Path

    from attack.config import load_config, read_yaml, refuse_file_trust, set_dotted, shipped, with_paths_from
    from attack.config.files import grant_code

    if args.config:
        args.config = str(shipped(args.config, "attack"))  # a path, or a shipped config's name (lora, full, ...)
    data = with_paths_from(read_yaml(args.config), Path(args.config).parent) if args.config else {}
    granted = getattr(args, "model.trust_remote_code") is True
    grant_code(granted)
    refuse_file_trust(data, f"config file {args.config}", granted=granted)
    if args.kind:
        data["kind"] = args.kind
    fields = config_fields()
    for key, field in fields.items():
        value = getattr(args, key)
        if value is not None:
            set_dotted(data, key, cli_value(key, field, value))
    if args.full:
        set_dotted(data, "adapter.kind", "full")
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = (part.strip() for part in item.split("=", 1))
        if key not in fields:
            raise UserError(f"unknown config key '{key}' in --set; see python -m attack --help for the keys")
        set_dotted(data, key, cli_value(key, fields[key], value))
    cfg = load_config(data)
    refuse_file_trust(cfg, "this attack", granted=granted)  # a reward named on the command line is code from a file too
    return cfg


def cli_value(key: str, field: FieldInfo, value):
    """A command-line string as the field's type: lists split on commas, mappings on KEY=VALUE,
    numbers parsed. The config's strict checks then see proper types, as from YAML."""
    from pydantic import TypeAdapter, ValidationError

    from attack.config import explain

    if not isinstance(value, str):
        return value  # a bool from --flag/--no-flag
    tp = field.annotation
    if value.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    shape = _container(tp)
    if value.strip()[:1] in ("[", "{"):  # YAML flow form, as in --help's examples: [{path: a.jsonl, share: 0.3}]
        from attack.config import parse_yaml

        try:
            value = parse_yaml(value)
        except Exception as e:  # a YAML error of any kind: the user's to fix
            raise UserError(f"{key}: {value!r} is not valid YAML flow ({str(e).splitlines()[0]})") from None
    elif shape is list:
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif shape is dict:
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise UserError(f"{key} expects KEY=VALUE[,KEY=VALUE], got {value!r}")
        value = {k.strip(): v.strip() for k, v in pairs}
    try:
        return TypeAdapter(tp).validate_python(value, strict=False)
    except ValidationError as e:
        raise UserError(explain(e, BaseModel, prefix=key)) from None


def _container(tp):
    """list or dict where a field holds one (also inside Optional and Annotated), else None."""
    while True:
        if typing.get_origin(tp) in (list, dict):
            return typing.get_origin(tp)
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(inner) == 1:
            tp = inner[0]
            continue
        return None


def _is_bool(tp) -> bool:
    return tp is bool or set(typing.get_args(tp)) == {bool, type(None)}


def _metavar(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if typing.get_origin(tp) is list:
        return "A,B"
    if typing.get_origin(tp) is dict:
        return "K=V,K=V"
    base = args[0] if args and typing.get_origin(tp) is not None else tp
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")


def _shown(default) -> str:
    if isinstance(default, list):
        return ",".join(map(str, default)) or "none"
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items()) or "none"
    return "none" if default in (None, "") else str(default)


def quiet_libraries() -> None:
    """Keep the terminal for the attack's own progress bar, table and errors."""
    import logging
    import warnings

    # bitsandbytes warns at import on CPUs without its optional kernels package; not our concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # PEFT looks for the base's config.json to check the vocabulary; a GGUF base has none.
    warnings.filterwarnings("ignore", message="Could not find a config file")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            quiet_libraries()
            module, _ = SUBCOMMANDS[argv[0]]
            code = import_module(module).main(argv[1:])
            signals.raise_pending()  # a signal swallowed on the way must not end as success
            return code
        if argv and not argv[0].startswith("-"):  # one attack takes flags only: a word first is a subcommand
            raise UserError(f"unknown subcommand '{argv[0]}'{did_you_mean(argv[0], SUBCOMMANDS)} (subcommands: "
                            f"{', '.join(SUBCOMMANDS)}; or flags for one attack: python -m attack --help)")
        # flags and config checked before the heavy libraries load: a typo is answered at once
        args = attack_parser().parse_args(_negative_numbers_attached(argv))
        cfg = config_from_args(args)
        quiet_libraries()
        if args.dry_run:
            return dry_run(cfg)
        from attack.recipes import run_attack

        run_attack(cfg)
        signals.raise_pending()
        _leave_process_group()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk shows up as OSError, torch's RuntimeError, safetensors' own error, ...
        if not _disk_full(e):
            raise
        where = getattr(e, "filename", None) or "while writing"
        print(f"error: disk full ({where}): free space, then {_again(argv)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{how}: {_again(argv)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def _again(argv: list[str]) -> str:
    """How to continue: a subcommand that drives runs (sweep, search, ...) picks up where it stopped
    when run again (and refuses --resume); one attack resumes with --resume."""
    if argv and argv[0] in SUBCOMMANDS:
        return f"run the same command again (python -m attack {argv[0]} ...): it picks up where it stopped"
    return "run the same command again with --resume"


def dry_run(cfg) -> int:
    """What a sweep's --dry-run does for its cells, for one attack: nothing is written."""
    from attack.preflight import check_config_offline
    from attack.rundir import RunDir

    check_config_offline(cfg)
    run = RunDir.for_config(cfg)
    steps, per_step = cfg.training_steps(), cfg.tokens_per_step()
    tokens = f"; {steps * per_step:,} tokens" if per_step is not None else ""  # RL: as generated
    points = len(cfg.curve_steps())
    print(f"{cfg.model.name}: {cfg.describe()}{tokens}, evaluated at {points} point{'s' * (points != 1)}")
    print(f"run directory: {run.path}" + (f" (exists, {run.status.value})" if run.path.exists() else ""))
    print("config, tasks, model location and local paths check out")
    return 0


def _leave_process_group() -> None:
    """Under accelerate/torchrun: leave the process group before exit. Left to interpreter
    teardown, gloo's threads sometimes abort a rank ("terminate called without an active
    exception") after the run has finished and been written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _disk_full(error: BaseException) -> bool:
    """A full disk or quota, wherever it struck: an OSError, or torch's and safetensors' own
    errors around one (torch.save says "file write failed", safetensors "StorageFull")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(m in text for m in ("No space left on device", "StorageFull", "file write failed", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _negative_numbers_attached(argv: list[str]) -> list[str]:
    """`--lr -1e-3` as `--lr=-1e-3`: argparse would read the value as an unknown flag."""
    out = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-") and _is_number(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def cli() -> None:
    """The process entry point of `python -m attack` and the installed `finetune-attack`
    command alike: SIGTERM (a scheduler's preemption) ends a run as Ctrl-C does, and neither can be
    lost inside a finalizer (attack/signals.py)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signals.install()
    sys.exit(main())


if __name__ == "__main__":
    cli()
