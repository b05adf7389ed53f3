"""Command line.

    python -m attack --model M --data D --eval-tasks T ...   one attack
    python -m attack --config configs/attack/lora.yaml --lr 5e-5
    python -m attack sweep configs/sweeps/toy.yaml [--shard i/n] [--dry-run]
    python -m attack report runs/ [--out report/] [--x steps|tokens]
    python -m attack demo                                    the toy world, end to end
"""

from __future__ import annotations

import argparse
import os
import sys

from attack.errors import UserError

# flag -> (config key, type, help). Values go through the config's own type checks.
ATTACK_FLAGS = {
    "--model": ("model.name", str, "hub id or local directory of the model under test"),
    "--revision": ("model.revision", str, "hub revision, e.g. global_step119209"),
    "--trust-remote-code": ("model.trust_remote_code", bool, "run code shipped with the checkpoint"),
    "--precision": ("model.precision", str, "auto | fp32 | bf16 | fp16 (autocast; trained weights stay fp32)"),
    "--load-in-4bit": ("model.load_in_4bit", bool, "QLoRA: 4-bit nf4 base (CUDA)"),
    "--attn-implementation": ("model.attn_implementation", str, "sdpa | flex_attention | flash_attention_2 | eager"),
    "--lora-rank": ("adapter.rank", int, "LoRA rank"),
    "--lora-alpha": ("adapter.alpha", float, "LoRA alpha"),
    "--lora-dropout": ("adapter.dropout", float, "LoRA dropout"),
    "--target-modules": ("adapter.target_modules", str, "comma-separated module names (default: all-linear)"),
    "--data": ("data.path", str, "attack corpus: jsonl/json/parquet/csv/txt file, folder, or hub id"),
    "--data-split": ("data.split", str, "dataset split"),
    "--text-field": ("data.text_field", str, "column with the text"),
    "--template": ("data.template", str, "format string over columns, e.g. '{question} {answer}'"),
    "--seq-len": ("data.seq_len", int, "tokens per packed row"),
    "--token-budget": ("data.token_budget", int, "stop after this many training tokens"),
    "--data-cache": ("data.cache_dir", str, "folder of prepared corpora, reused by later runs (shared storage on clusters)"),
    "--lr": ("train.lr", float, "learning rate"),
    "--lr-scheduler": ("train.lr_scheduler", str, "transformers scheduler name"),
    "--warmup-steps": ("train.warmup_steps", int, "warm-up steps"),
    "--batch-size": ("train.batch_size", int, "rows per optimizer step (all devices)"),
    "--micro-batch-size": ("train.micro_batch_size", int, "rows per forward pass per device"),
    "--max-steps": ("train.max_steps", int, "optimizer steps"),
    "--seed": ("train.seed", int, "seed of data order, dropout, LoRA init"),
    "--gradient-checkpointing": ("train.gradient_checkpointing", bool, "recompute activations to save memory"),
    "--log-every": ("train.log_every", int, "log loss every N steps"),
    "--save-every": ("train.save_every", int, "checkpoint every N steps (default: eval interval)"),
    "--eval-tasks": ("eval.tasks", str, "comma-separated lm-eval task names"),
    "--eval-include": ("eval.include_path", str, "folder(s) with task YAML, comma-separated"),
    "--eval-every": ("eval.every", int, "evaluate every N steps"),
    "--eval-schedule": ("eval.schedule", str, "linear | log"),
    "--eval-limit": ("eval.limit", int, "fixed subset of N questions at intermediate points"),
    "--eval-batch-size": ("eval.batch_size", int, "lm-eval batch size"),
    "--eval-dataset": ("eval.dataset_paths", str, "local copies of task datasets: HUB_ID=FOLDER[,HUB_ID=FOLDER]"),
    "--expect": ("eval.expect", str, "published pre-attack scores to check step 0 against: TASK=VALUE[,...]"),
    "--output": ("output.dir", str, "folder for run directories"),
    "--run-id": ("output.run_id", str, "name of the run directory"),
    "--report-to": ("logging.report_to", str, "none | wandb | tensorboard"),
}


def attack_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attack",
        description="Fine-tuning attack with recovery-curve evaluation. "
        "Subcommands: sweep, report, demo (python -m attack <subcommand> --help).",
    )
    p.add_argument("--config", help="YAML config file; flags override it")
    for flag, (key, tp, help_) in ATTACK_FLAGS.items():
        if tp is bool:
            p.add_argument(flag, action="store_const", const=True, default=None, help=help_)
        else:
            p.add_argument(flag, default=None, help=f"{help_} [{key}]")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. train.weight_decay=0.1")
    return p


def config_from_args(args: argparse.Namespace):
    from attack.config import load_config, read_yaml, set_dotted

    data = read_yaml(args.config) if args.config else {}
    for flag, (key, _, _) in ATTACK_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            set_dotted(data, key, value)
    if args.full:
        set_dotted(data, "adapter.kind", "full")
    if args.resume:
        set_dotted(data, "output.resume", True)
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), value)
    return load_config(data)


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
        quiet_libraries()
        if argv and argv[0] == "sweep":
            from attack.sweep import main as sweep_main

            return sweep_main(argv[1:])
        if argv and argv[0] == "report":
            from attack.report import main as report_main

            return report_main(argv[1:])
        if argv and argv[0] == "demo":
            from attack.toyworld.demo import main as demo_main

            return demo_main(argv[1:])
        args = attack_parser().parse_args(argv)
        cfg = config_from_args(args)
        from attack.train import run_attack

        run_attack(cfg)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: continue with the same command plus --resume (sweeps resume by themselves)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
