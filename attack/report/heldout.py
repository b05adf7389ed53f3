"""Held-out text on the loss (eval.heldout_texts): tokens to baseline.

For each model x attack x held-out text: the attack tokens at which the model's bits per byte on
the held-out documents first reach the reference model's pre-attack bits per byte (linearly
interpolated between the two evaluation points around the crossing), or "not reached" with the
last value. Loss moves before accuracy does and with far less noise (Signal and Noise, 2508.13144);
the token-filtering work (2601.21571) reports robustness this way."""

from __future__ import annotations

import numpy as np
import pandas as pd

from attack.report.page import Block, ReportData

LOSS_METRICS = ("bits_per_byte", "word_perplexity", "byte_perplexity")


def loss_tasks(picked: pd.DataFrame) -> set[str]:
    """The tasks whose headline is a loss (lower is better): the held-out texts."""
    return set(picked[picked.headline_metric.isin(LOSS_METRICS)].task)


def crossing(tokens: list[float], values: list[float], target: float) -> float | None:
    """The tokens at which the curve first reaches `target` (at or below), interpolated between
    the points around the crossing; None when it never does."""
    for i, (t, v) in enumerate(zip(tokens, values, strict=True)):
        if v <= target:
            if i == 0:
                return float(t)
            t0, v0 = tokens[i - 1], values[i - 1]
            return float(t0 + (v0 - target) / (v0 - v) * (t - t0))
    return None


def tokens_to_baseline(d: pd.DataFrame) -> pd.DataFrame:
    """One row per model x attack x loss task, from curve rows on bits per byte, where a
    reference model (role reference, else unfiltered) was scored at step 0."""
    d = d[d.metric == "bits_per_byte"]
    rows = []
    for task, t in d.groupby("task"):
        ref_role = "reference" if (t.role == "reference").any() else "unfiltered"
        ref = t[(t.role == ref_role) & (t.step == 0)].value.mean()
        if not np.isfinite(ref):
            continue
        for (model, attack), g in t[t.role != ref_role].groupby(["model", "attack"]):
            curve = g.groupby("step").agg(tokens=("tokens_seen", "mean"), value=("value", "mean")).sort_index()
            at = crossing(list(curve.tokens.fillna(0)), list(curve.value), ref)
            rows.append(dict(model=model, attack=attack, task=task, tokens=at, reached=at is not None,
                             reference_bpb=round(ref, 5), pre_bpb=round(float(curve.value.iloc[0]), 5),
                             last_bpb=round(float(curve.value.iloc[-1]), 5), last_tokens=float(curve.tokens.iloc[-1])))
    return pd.DataFrame(rows, columns=["model", "attack", "task", "tokens", "reached", "reference_bpb", "pre_bpb",
                                       "last_bpb", "last_tokens"])


def section(r: ReportData) -> list[Block]:
    table = tokens_to_baseline(r.df)
    if table.empty:
        return []
    table.to_csv(r.out / "tokens_to_baseline.csv", index=False)
    shown = table.assign(tokens=[f"{t:,.0f}" if ok else f"not reached (last {b:.3f} at {lt:,.0f})"
                                 for t, ok, b, lt in zip(table.tokens, table.reached, table.last_bpb, table.last_tokens,
                                                         strict=True)])
    return [Block(level=3, in_markdown=True, text="Held-out text, tokens to baseline:", links=["tokens_to_baseline.csv"]),
            Block("Held-out text: tokens to baseline", table=shown[["model", "attack", "task", "tokens",
                                                                                       "reference_bpb", "pre_bpb",
                                                                                       "last_bpb"]],
                  text="Attack tokens at which the held-out documents' bits per byte first reach the reference model's "
                       "pre-attack value (interpolated between evaluation points; tokens_to_baseline.csv). The "
                       "held-out texts share no 13-word passage with the attack corpus.")]
