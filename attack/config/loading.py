"""Building a config from plain data: validation, the one-line error that names the key and the
fix, what no default can supply, and dotted-key edits."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from attack.config.kinds import DEFAULT_KIND, KINDS, AttackConfig
from attack.config.sections import EvalConfig
from attack.errors import UserError, did_you_mean


def load_config(data: dict) -> AttackConfig:
    """Build, validate and freeze the config of the kind named in `data` (default finetune)."""
    if not isinstance(data, dict):
        raise UserError(f"a config must be a mapping of sections, got {data!r}")
    kind = data.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        cfg = KINDS[kind].model_validate(data)
    except ValidationError as e:
        raise UserError(explain(e, KINDS[kind])) from None
    check_required(cfg)
    return cfg


def explain(error: ValidationError, schema: type[BaseModel], prefix: str = "") -> str:
    """The first problem of a pydantic error as one line that names the key and the fix. A
    sentence of our own checks (a value error) comes first: where a value may take one of several
    forms (a list of choices or a range), the others' type errors say nothing useful."""
    errors = error.errors()
    e = next((x for x in errors if x["type"] == "value_error"), errors[0])
    # a union's member names (list[...], Range) are pydantic's, not keys of the file
    loc = [str(p) for p in e["loc"] if not ("[" in str(p) or str(p)[:1].isupper() and _is_model_name(str(p)))]
    key = ".".join([*([prefix] if prefix else []), *loc])
    got = e.get("input")
    kind = e["type"]
    if kind == "extra_forbidden":
        fields = fields_at(schema, loc[:-1])
        return f"unknown config key '{key}'{did_you_mean(loc[-1], fields)}; valid keys here: {', '.join(fields)}"
    if kind == "value_error":  # a cross-field check: its message is already the sentence
        return e["msg"].removeprefix("Value error, ")
    what = {
        "greater_than": f"must be > {e.get('ctx', {}).get('gt')}",
        "greater_than_equal": f"must be >= {e.get('ctx', {}).get('ge')}",
        "less_than": f"must be < {e.get('ctx', {}).get('lt')}",
        "less_than_equal": f"must be <= {e.get('ctx', {}).get('le')}",
        "too_short": "must not be empty",
        "string_too_short": "must not be empty",
        "literal_error": f"must be one of {e.get('ctx', {}).get('expected', '').replace(' or ', ', ')}",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping of keys to values",
        "string_pattern_mismatch": "must be a plain name (letters, digits, . _ @ + = -; no path)",
    }.get(kind, e["msg"].lower())
    return f"{key or 'config'} {what}, got {got!r}"


def _is_model_name(name: str) -> bool:
    """Whether a location part names a pydantic model class (a union member pydantic inserts)."""
    todo = [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__name__ == name:
                return True
            todo.append(sub)
    return False


def fields_at(schema: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the section at `path` (e.g. ["train"]) of a config class."""
    for name in path:
        if name not in schema.model_fields:
            return []
        schema = schema.model_fields[name].annotation
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            return []
    return list(schema.model_fields)


def check_required(cfg: AttackConfig) -> None:
    """What every attack needs and no default can supply, with the flag that supplies it."""
    if not cfg.model.name:
        raise UserError("no model given: pass --model <hub-id or local dir> or set model.name")
    if not cfg.eval.tasks:
        raise UserError("no evaluation tasks given: pass --eval-tasks task1,task2 or set eval.tasks")
    cfg.check_required()


def check_dataset_copies(cfg: EvalConfig) -> None:
    """Every local copy named in eval.dataset_paths is a folder (checked before anything loads)."""
    for hub_id, folder in cfg.dataset_paths.items():
        if not Path(folder).expanduser().is_dir():
            raise UserError(f"eval.dataset_paths: the local copy of {hub_id} is not a folder: {folder}")


def updated(cfg: AttackConfig, changes: dict) -> AttackConfig:
    """A copy of cfg with {dotted.key: value} changes, validated again."""
    data = to_dict(cfg)
    for key, value in changes.items():
        set_dotted(data, key, value)
    return load_config(data)


def to_dict(cfg) -> dict:
    return cfg.model_dump(mode="python")


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
