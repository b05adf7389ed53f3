"""The report's view of GRPO runs: the reward signal beside the recovery curve (reward mean,
its spread, and the share of groups with nothing left to elicit), and GRPO against
fine-tuning at the same number of steps."""

from __future__ import annotations

import pandas as pd

from attack.records import read_rewards
from attack.report.page import Block, ReportData, figure, pyplot
from attack.report.runs import kinds_with, run_records, runs_with_section
from attack.rundir import RunDir


def reward_rows(df: pd.DataFrame) -> pd.DataFrame:
    """rewards.jsonl of every GRPO run, with its model, attack and seed."""
    return run_records(runs_with_section(df, "grpo"), lambda path: read_rewards(RunDir(path).rewards))


def at_matched_steps(picked: pd.DataFrame) -> pd.DataFrame:
    """Per model, task and GRPO setting: its final score (mean over seeds) at its last step S, and
    each supervised fine-tuning setting's score at the last evaluated step not after S."""
    grpo = runs_with_section(picked, "grpo")
    sft = picked[picked.kind.isin(kinds_with(set(picked.kind), "supervised"))]
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
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.6))
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


def section(r: ReportData) -> list[Block]:
    """GRPO against fine-tuning at matched steps (grpo_vs_finetune.csv) and the reward signal
    (rewards.csv, rewards_<attack>.png)."""
    if runs_with_section(r.df, "grpo").empty:
        return []
    matched = at_matched_steps(r.picked)
    matched.to_csv(r.out / "grpo_vs_finetune.csv", index=False)
    note = ("A group whose completions all score the same has no advantage and gives no gradient: a high "
            "frac_reward_zero_std with a low reward means the model never samples the answer (nothing left to elicit).")
    blocks = [Block("GRPO against fine-tuning at the same number of steps (mean over seeds)", table=matched),
              Block("GRPO reward signal", text=note)]
    rewards = reward_rows(r.df)
    if rewards.empty:
        return blocks
    rewards.to_csv(r.out / "rewards.csv", index=False)
    last = rewards[rewards.step == rewards.groupby(["model", "attack", "seed"]).step.transform("max")]
    blocks.append(Block(table=last.groupby(["model", "attack"])[["step", "reward", "reward_std",
                                                                  "frac_reward_zero_std"]].mean().reset_index()))
    for attack in sorted(rewards.attack.unique()):
        blocks.append(Block(attack, level=3, figure=figure(plot_rewards(rewards, attack), r.out, f"rewards_{attack}.png")))
    return blocks
