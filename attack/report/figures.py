"""The report's figures: recovery curves as small multiples (a panel per model, the same axes in
every panel, one colour per attack setting across every figure, the legend outside the axes,
seeds as bands), and the verdict's heatmap of recovered fractions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from attack.report.page import pyplot


def attack_colors(attacks) -> dict:
    """One colour per attack setting, the same in every figure of the report."""
    plt = pyplot()
    names = sorted(set(attacks))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {a: cmap(i % cmap.N) for i, a in enumerate(names)}


def dense_early(steps) -> bool:
    """Whether the evaluation points crowd the start (a log schedule): a linear axis would
    squeeze the part that matters into its left edge."""
    s = sorted(x for x in set(steps) if x > 0)
    return len(s) >= 4 and s[-1] >= 20 and sum(x <= s[-1] / 10 for x in s) >= 3


def plot_task(d: pd.DataFrame, task: str, x: str, refs: dict, colors: dict, one_shot: set):
    """Recovery curves of one task, a panel per model; `d` holds one metric per task. Attack
    settings in `one_shot` (no optimizer steps: an edit) are markers at their step, not lines."""
    plt = pyplot()
    d = d[d.task == task]
    metric = d.metric.iloc[0]
    xcol = "step" if x == "steps" else "tokens_seen"
    models = sorted(d.model.unique())
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.6), dpi=100, sharex=True, sharey=True,
                             squeeze=False)
    handles = {}
    chance = d.chance.dropna()
    for ax, model in zip(axes.flat, models, strict=False):
        for attack in sorted(d[d.model == model].attack.unique()):
            g = d[(d.model == model) & (d.attack == attack)]
            per = g.groupby(["seed", "step"]).agg(v=("value", "mean"), t=("tokens_seen", "mean")).reset_index()
            xs = per.groupby("step")["t" if xcol == "tokens_seen" else "step"].mean()
            stats = per.groupby("step")["v"].agg(["mean", "min", "max", "count"])
            color = colors[attack]
            if attack in one_shot:
                h, = ax.plot(xs.values, stats["mean"].values, ls="none", marker="D", ms=6, color=color,
                             markeredgecolor="black", markeredgewidth=0.6)
            else:
                h, = ax.plot(xs.values, stats["mean"].values, "-", marker="o", ms=2.5, lw=1.6, color=color)
                if stats["count"].max() > 1:
                    ax.fill_between(xs.values, stats["min"].values, stats["max"].values, color=color, alpha=0.18, lw=0)
            seeds = int(stats["count"].max())
            handles.setdefault(attack + (f" ({seeds} seeds, band min-max)" if seeds > 1 else ""), h)
        if metric in ("acc", "acc_norm") and len(chance):
            h = ax.axhline(float(chance.iloc[0]), color="grey", ls=":", lw=1.2)
            handles.setdefault(f"chance ({float(chance.iloc[0]):.2f})", h)
        if task in refs:
            h = ax.axhline(refs[task], color="black", ls="--", lw=1.2)
            handles.setdefault(f"reference, pre-attack ({refs[task]:.2f})", h)
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    if dense_early(d.step):
        # symmetric log: step 0 (the pre-attack score) stays on the axis, the early steps spread out
        per_step = d[d.step > 0].tokens_seen / d[d.step > 0].step if xcol == "tokens_seen" else None
        linthresh = float(per_step.median()) if per_step is not None and len(per_step) else 1.0
        for ax in axes.flat:
            ax.set_xscale("symlog", linthresh=max(linthresh, 1.0), linscale=0.5)
            ax.set_xlim(left=0)
    for ax in axes[-1]:
        ax.set_xlabel("attack steps" if x == "steps" else "attack tokens seen")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric)
    fig.suptitle(f"Recovery on {task}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    # the legend beside the panels, never over a curve
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.93), fontsize=8,
               frameon=False)
    return fig


def plot_heatmap(table: pd.DataFrame, value: str = "recovered"):
    """Recovered fraction of the gap per attack setting (rows) x model (columns), a panel per
    target task; `table` has model, attack, task and `value`. A cell whose attack broke the
    model (utility bound) is marked with an x. Settings run down the page, strongest first, so
    forty adversaries stay forty legible rows at page width instead of a strip of tiny columns."""
    plt = pyplot()
    tasks = sorted(table.task.unique())
    models = sorted(table.model.unique())
    strongest = table.groupby("attack")[value].max().fillna(-np.inf)
    attacks = sorted(table.attack.unique(), key=lambda a: (-strongest.get(a, -np.inf), a))
    label_in = 0.3 + 0.065 * max(len(str(a)) for a in attacks)  # room for the longest setting's name
    fig, axes = plt.subplots(1, len(tasks), figsize=(label_in + 0.4 + 1.3 * len(models) * len(tasks) + 1.0,
                                                     1.2 + 0.28 * len(attacks) + 0.08 * max(len(str(m)) for m in models)),
                             dpi=100, squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    for k, (ax, task) in enumerate(zip(axes[0], tasks, strict=True)):
        t = table[table.task == task]
        grid = t.pivot_table(index="attack", columns="model", values=value, aggfunc="mean").reindex(index=attacks,
                                                                                                    columns=models)
        image = ax.imshow(np.clip(grid.to_numpy(dtype=float), -0.1, 1.1), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        broken = set(zip(t[t.broken].model, t[t.broken].attack, strict=True)) if "broken" in t else set()
        for i, a in enumerate(attacks):
            for j, m in enumerate(models):
                v = grid.iloc[i, j]
                text = "n/a" if not np.isfinite(v) else f"{v:.2f}" + (" x" if (m, a) in broken else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if not np.isfinite(v) or v > 0.6 else "white")
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks if k == 0 else [""] * len(attacks), fontsize=8)
        ax.set_title(task, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.04, pad=0.02, label="recovered fraction of the gap")
    return fig
