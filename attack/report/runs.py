"""Run directories read into one table: every curve row with its run's model, role, attack,
kind, seed and status, and each task's facts from tasks.json. The report, the demo and any
analysis start here (`load_curves`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attack.config.kinds import DEFAULT_KIND
from attack.errors import UserError, first_line
from attack.files import read_json
from attack.records import CellMeta, Status, read_curve
from attack.rundir import RunDir
from eval_callbacks.task_lookup import ORIENTED, headline_metric, oriented


def find_runs(paths: list[str | Path]) -> list[Path]:
    runs = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"no such run folder: {p}")
        found = {c.parent for c in p.rglob(RunDir(p).curve.name)}
        # a run inside another run's folder (the counterfactual's reruns) is that run's analysis,
        # read by its attribution section, not a run of its own
        runs += sorted(r for r in found if not any(a in found for a in r.parents))
    return runs


def load_curves(paths: list[str | Path] | str | Path) -> pd.DataFrame:
    """All curve rows of the run directories under `paths`, one row per (run, step, task, metric),
    with columns model, role, attack, seed, run, step, tokens_seen, task, metric, value, stderr, n, chance,
    headline (a task or group asked for, not a subtask lm-eval expanded) and headline_metric."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for run in find_runs(paths):
        rundir = RunDir(run)
        rows = read_curve(rundir.curve)
        if not rows:
            continue
        meta = _run_meta(rundir)
        tasks = read_json(rundir.tasks_path)
        tasks = tasks if isinstance(tasks, dict) else {}  # a tasks.json of another shape says nothing
        df = pd.DataFrame(rows)
        for optional in ("tokens_seen", "stderr", "n", "train_loss", "wall_s"):  # curves other tools wrote
            if optional not in df:
                df[optional] = float("nan")
        for k, v in meta.items():
            df[k] = v
        info = {t: i if isinstance(i, dict) else {} for t, i in tasks.items()}
        df["chance"] = df["task"].map({t: i.get("chance") for t, i in info.items()})
        df["headline"] = df["task"].map({t: i.get("requested", True) for t, i in info.items()}).fillna(True).astype(bool)
        df["headline_metric"] = df["task"].map({t: oriented(headline_metric(i)) for t, i in info.items()}).fillna(headline_metric(None))
        df["task_role"] = df["task"].map({t: i.get("role") for t, i in info.items()})
        flip = df.metric.isin(ORIENTED)
        df.loc[flip, "value"] = 1 - df.loc[flip, "value"]
        df.loc[flip, "metric"] = df.loc[flip, "metric"].map(ORIENTED)
        frames.append(df)
    if not frames:
        raise UserError(f"no curve rows found under {', '.join(map(str, paths))}")
    return _comparable(pd.concat(frames, ignore_index=True))


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Runs count as seeds of one row only when their configs agree in everything but the seed.
    A label shared by different configs (another world, another step grid) becomes separate rows,
    each marked with its config id, never a silent mean."""
    ids = df.groupby(["model", "attack"])["config_id"].nunique()
    mixed = set(ids[ids > 1].index)
    if mixed:
        marked = [(m, a) in mixed for m, a in zip(df.model, df.attack, strict=True)]
        df.loc[marked, "attack"] = df.loc[marked, "attack"] + " [config " + df.loc[marked, "config_id"] + "]"
    return df


def config_id(run: RunDir) -> str:
    """A hash of the run's config.yaml without what does not decide the result, nor the seed."""

    import yaml

    from attack.config.identity import setting_hash

    try:
        cfg = yaml.safe_load(run.config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "unknown"
    if not isinstance(cfg, dict):
        return "unknown"
    return setting_hash(cfg)


def _run_meta(run: RunDir) -> dict:
    cell: CellMeta | None = run.cell
    if cell and all(isinstance(cell.get(k), str) for k in ("model", "role", "attack")) and isinstance(cell.get("seed"), int):
        meta = dict(model=cell["model"], role=cell["role"], attack=cell["attack"],
                    kind=str(cell.get("kind", DEFAULT_KIND)), seed=cell["seed"])
    elif not run.config.exists():  # curves alone (written by other tools): named after the folder
        meta = dict(model=run.path.name, role="other", attack="attack", kind=DEFAULT_KIND, seed=0)
    else:  # a single run: describe it from its config
        cfg = _saved_config(run)
        meta = dict(model=Path(cfg.model.name.rstrip("/")).name or run.path.name, role="other", attack=cfg.label(),
                    kind=cfg.kind, seed=cfg.seed)
    meta.update(run=run.path.name, path=str(run.path), status=str(run.status), config_id=config_id(run))
    return meta


def _saved_config(run: RunDir):
    from attack.config import load_config, parse_yaml

    try:
        return load_config(parse_yaml(run.config.read_text()))
    except Exception as e:  # unreadable YAML, or a config this version does not accept
        raise UserError(f"{run.config} is not a readable config ({first_line(e)}); repair it or leave that run "
                        "out") from None


def kinds_with(kinds, attribute: str, value=None) -> set[str]:
    """The kinds among `kinds` whose config class has `attribute` set (a truthy class attribute,
    or a report section name in its `sections` when `value` is given)."""
    from attack.config import KINDS

    out = set()
    for kind in kinds:
        schema = KINDS.get(kind)
        got = getattr(schema, attribute, None) if schema else None
        if (value in (got or ()) if value is not None else got):
            out.add(kind)
    return out


def runs_with_section(df: pd.DataFrame, section: str) -> pd.DataFrame:
    """The rows of runs whose kind has the report section `section` (e.g. "ablation")."""
    return df[df.kind.isin(kinds_with(set(df.kind), "sections", section))]


def run_records(df: pd.DataFrame, read) -> pd.DataFrame:
    """`read(run_path)` (a list of dict rows, e.g. a run's dose.jsonl) for every run in the curve
    table `df`, each row tagged with its run's model, attack and seed."""
    frames = []
    for (_run, path), meta in df.groupby(["run", "path"]).first().iterrows():
        rows = pd.DataFrame(read(Path(path)))
        if rows.empty:
            continue
        for k in ("model", "attack", "seed"):
            rows[k] = meta[k]
        frames.append(rows)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pick_metric(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One metric per task: `metric` for all, or each task's headline metric when None."""
    return df[df.metric == metric] if metric else df[df.metric == df.headline_metric]


def run_warnings(paths: list[str | Path]) -> list[str]:
    """The warnings the runs recorded in summary.json: step-0 mismatches with published scores,
    attacks that changed nothing."""
    out = []
    for run in find_runs(paths):
        found = (RunDir(run).summary or {}).get("warnings")
        for w in found if isinstance(found, list) else []:
            out.append(f"{run.name}: {w}")
    return out


def environments(df: pd.DataFrame) -> list[str]:
    """The distinct software and hardware the runs were measured on (from env.json), with how
    many runs each: scores from different stacks may differ for that reason alone."""
    keys = ("torch", "transformers", "peft", "lm_eval", "datasets", "device", "git_sha")
    seen: dict[str, int] = {}
    for path in df.path.unique():
        env = read_json(RunDir(Path(path)).env)
        env = env if isinstance(env, dict) else {}
        line = ", ".join(f"{k} {env.get(k)}" for k in keys if env.get(k))
        seen[line or "unknown"] = seen.get(line or "unknown", 0) + 1
    return [f"{line} ({n} run{'s' if n > 1 else ''})" for line, n in seen.items()]


def failed_runs(df: pd.DataFrame) -> dict[str, str]:
    """{run: error} of the runs whose summary says failed."""
    out = {}
    for run, path in df[df.status == Status.FAILED][["run", "path"]].drop_duplicates().itertuples(index=False):
        out[run] = first_line((RunDir(Path(path)).summary or {}).get("error") or "failed")
    return out

