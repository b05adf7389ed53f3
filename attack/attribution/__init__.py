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
import logging
import warnings
from pathlib import Path


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
