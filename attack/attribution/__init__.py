"""Which attack documents drove the recovery.

    collect.py         during the attack (opt-in: --attribution on a LoRA fine-tune): one gradient
                       per document piece (Bergson) and every evaluated question's gradient at each
                       evaluation point
    attribute.py       `python -m attack attribute RUN_DIR`: rankings per question and point
                       (gradient, TracIn, BM25, random) -> attribution.jsonl, attribution_summary.json
    trackstar.py       after the attack, from the final weights: Bergson's TrackStar
    ekfac.py           after the attack, from the final weights: Kronfluence's EK-FAC influence
    rankings.py        each method's ranking of the documents for the counterfactual

Its test, the attack rerun without the top-k documents and without k random ones, is a driver
beside the sweep (attack/counterfactual.py); the report's section is attack/report/attribution.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attack.errors import UserError
from attack.files import write_atomic


@contextlib.contextmanager
def library_output_to(path: Path):
    """What an attribution library prints (progress bars, INFO logs: Bergson sets the root logger
    to INFO when imported; its and Kronfluence's deprecation warnings) goes to `path` in the run,
    not to the attack's terminal."""
    root = logging.getLogger()
    level = root.level
    with open(path, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        root.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.setLevel(level)


def scores_once(run, folder: Path, key: str, method: str,
                compute: Callable[[Path], tuple[np.ndarray, float, dict]]) -> tuple[np.ndarray, float]:
    """A method's scores (documents x questions) from the final weights, computed once per `key`
    (its settings and question set) in `folder`, then read back with the seconds they took. A
    half-finished computation is not resumed (it takes seconds to minutes): its folder is cleared,
    but only once the run is known to have attacked weights to score."""
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return np.load(folder / "scores.npy"), json.loads(done.read_text())["seconds"]
    if not (run.final / "config.json").exists() and not (run.final / "adapter_config.json").exists():
        raise UserError(f"{run.path} has no attacked weights in {run.final}; {method} scores the final model")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    scores, seconds, details = compute(folder)
    np.save(folder / "scores.npy", scores)
    write_atomic(done, json.dumps({"key": key, "seconds": round(seconds, 2), **details}))
    return scores, seconds
