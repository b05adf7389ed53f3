"""The kinds of attack: one config class per kind (its sections and its answers to the kind
questions); the recipe of the same name runs it (attack/recipes/__init__.py). A new kind is one
config module here, added to KINDS, and one recipe file."""

from attack.config.ablation import AblationConfig
from attack.config.evaluate import EvaluateConfig
from attack.config.finetune import FinetuneConfig
from attack.config.grpo import GrpoConfig
from attack.config.incontext import IncontextConfig
from attack.config.quantize import QuantizeConfig

DEFAULT_KIND = "finetune"  # the kind of a config or sweep attack that names none

KINDS: dict[str, type] = {"finetune": FinetuneConfig, "ablation": AblationConfig, "grpo": GrpoConfig,
                          "quantize": QuantizeConfig, "incontext": IncontextConfig,
                          "evaluate": EvaluateConfig}
AttackConfig = FinetuneConfig | AblationConfig | GrpoConfig | QuantizeConfig | IncontextConfig | EvaluateConfig
