"""The attack's configuration: one schema, validated by pydantic in strict mode, frozen once built.
Unknown keys, wrong types and out of range values end in one line naming the key (`explain`).

A config has a top-level `kind`, the attack family, and the sections that kind uses:

    every kind   model, eval, output, logging
    finetune     adapter, data, train, perturb, attribution
    ablation     ablation; adapter, data, train for the fine-tune that may follow it
    grpo         grpo (the reward split and the reward), adapter, train
    quantize     quantize
    incontext    incontext (retrieved passages, solved examples); data (the default corpus)
    evaluate     nothing more: no attack, the model scored as it is

A section of another kind is an unknown key. Every field's docstring is its `--help` text
(attack/__main__.py derives the flags from this schema).

Where things are:

    sections.py   the sections every kind shares (model, adapter, data, train, eval, output, ...)
    kind.py       AttackKind: what every kind's config has and the questions every kind answers
    finetune.py, ablation.py, grpo.py, quantize.py, incontext.py, evaluate.py   one kind each: its own sections and answers
    kinds.py      KINDS, the name-to-class table
    loading.py    load_config, the one-line error (explain), dotted-key edits
    files.py      YAML files, paths relative to the file, the trust_remote_code refusal
    identity.py   what decides the result: identity, config_hash, default_run_id
"""

from attack.config.ablation import AblationConfig, AblationSection
from attack.config.evaluate import EvaluateConfig
from attack.config.files import INPUT_PATHS, parse_yaml, read_yaml, refuse_file_trust, shipped, with_paths_from
from attack.config.finetune import FinetuneConfig
from attack.config.grpo import GrpoConfig, GrpoSection
from attack.config.identity import config_hash, default_run_id, dump_yaml, identity, identity_of
from attack.config.incontext import IncontextConfig, IncontextSection
from attack.config.kind import AttackKind
from attack.config.kinds import KINDS, AttackConfig
from attack.config.loading import check_dataset_copies, check_required, explain, fields_at, load_config, merge, set_dotted, to_dict, updated
from attack.config.quantize import QuantizeConfig, QuantizeSection
from attack.config.sections import (
                                   AdapterConfig,
                                   AttributionSection,
                                   DataConfig,
                                   EvalConfig,
                                   LoggingConfig,
                                   MixSource,
                                   ModelConfig,
                                   OutputConfig,
                                   PerturbSection,
                                   Positive,
                                   Section,
                                   TrainConfig,
)

__all__ = ["AblationConfig", "AblationSection", "AdapterConfig", "AttackConfig", "AttackKind", "AttributionSection",
           "DataConfig", "EvalConfig", "EvaluateConfig", "FinetuneConfig", "GrpoConfig", "GrpoSection", "INPUT_PATHS", "IncontextConfig",
           "IncontextSection", "KINDS",
           "LoggingConfig", "MixSource", "ModelConfig", "OutputConfig", "PerturbSection", "Positive", "QuantizeConfig",
           "QuantizeSection", "Section", "TrainConfig", "check_dataset_copies", "check_required", "config_hash",
           "default_run_id", "dump_yaml", "explain", "fields_at", "identity", "identity_of", "load_config", "merge",
           "parse_yaml", "read_yaml", "refuse_file_trust", "set_dotted", "shipped", "to_dict", "updated", "with_paths_from"]
