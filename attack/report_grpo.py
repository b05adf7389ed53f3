"""The report's view of GRPO runs: the reward signal beside the recovery curve (reward mean,
its spread, and the share of groups with nothing left to elicit), and GRPO against
fine-tuning at the same number of steps."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from attack.report_ablation import three_places  # noqa: E402
from attack.rundir import read_rewards  # noqa: E402
from attack.runs import run_records  # noqa: E402


def reward_rows(df: pd.DataFrame) -> pd.DataFrame:
    """rewards.jsonl of every GRPO run, with its model, attack and seed."""
    return run_records(df[df.kind == "grpo"], lambda run: read_rewards(run / "rewards.jsonl"))


def at_matched_steps(picked: pd.DataFrame) -> pd.DataFrame:
    """Per model, task and GRPO setting: its final score (mean over seeds) at its last step S, and
    each fine-tuning setting's score at the last evaluated step not after S."""
    grpo = picked[picked.kind == "grpo"]
    sft = picked[picked.kind == "finetune"]
    rows = []
    for (model, task, attack), g in grpo.groupby(["model", "task", "attack"]):
        step = int(g.step.max())
        row = dict(model=model, task=task, step=step, pre=g[g.step == 0].value.mean(), **{attack: g[g.step == step].value.mean()})
        for other, f in sft[(sft.model == model) & (sft.task == task)].groupby("attack"):
            before = f[f.step <= step]
            if len(before):
                row[other] = before[before.step == before.step.max()].value.mean()
        rows.append(row)
    return pd.DataFrame(rows)


def plot_rewards(rewards: pd.DataFrame, attack: str):
    d = rewards[rewards.attack == attack]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for model, g in d.groupby("model"):
        mean = g.groupby("step")[["reward", "reward_std", "frac_reward_zero_std"]].mean()
        line, = left.plot(mean.index, mean.reward, label=model)
        left.fill_between(mean.index, mean.reward - mean.reward_std, mean.reward + mean.reward_std,
                          color=line.get_color(), alpha=0.15)
        right.plot(mean.index, mean.frac_reward_zero_std, label=model)
    left.set(xlabel="step", ylabel="reward (mean; band: spread)", title=attack)
    right.set(xlabel="step", ylabel="groups with equal rewards", ylim=(-0.02, 1.02),
              title="frac_reward_zero_std (no gradient)")
    left.legend(fontsize=7)
    fig.tight_layout()
    return fig


def grpo_section(df: pd.DataFrame, picked: pd.DataFrame, out: Path, png) -> tuple[list[str], list[str]]:
    """Markdown lines and HTML parts; empty when no run is a GRPO run. Writes rewards.csv and
    grpo_vs_finetune.csv. `png(fig)` gives a figure's base64 PNG."""
    if "kind" not in df or not (df.kind == "grpo").any():
        return [], []
    rewards = reward_rows(df)
    matched = at_matched_steps(picked)
    matched.to_csv(out / "grpo_vs_finetune.csv", index=False)
    note = ("A group whose completions all score the same has no advantage and gives no gradient: a high "
            "frac_reward_zero_std with a low reward means the model never samples the answer (nothing left to elicit).")
    md = ["", "## GRPO against fine-tuning at the same number of steps (mean over seeds)", "",
          three_places(matched).to_markdown(index=False), "", "## GRPO reward signal", "", note]
    html = ["<h2>GRPO against fine-tuning at the same number of steps</h2>" + three_places(matched).to_html(index=False),
            f"<h2>GRPO reward signal</h2><p>{note}</p>"]
    if not rewards.empty:
        rewards.to_csv(out / "rewards.csv", index=False)
        last = rewards[rewards.step == rewards.groupby(["model", "attack", "seed"]).step.transform("max")]
        final = last.groupby(["model", "attack"])[["step", "reward", "reward_std", "frac_reward_zero_std"]].mean().reset_index()
        md += ["", three_places(final).to_markdown(index=False)]
        html.append(three_places(final).to_html(index=False))
        for attack in sorted(rewards.attack.unique()):
            b64 = png(plot_rewards(rewards, attack))
            safe = re.sub(r"[^\w.-]", "-", attack)  # labels may hold a module:function reward
            (out / f"rewards_{safe}.png").write_bytes(base64.b64decode(b64))
            html.append(f"<h3>{attack}</h3><img src='data:image/png;base64,{b64}'/>")
    return md, html
