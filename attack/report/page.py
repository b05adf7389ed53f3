"""The report as one ordered list of blocks, rendered twice: recovery.md and a self-contained
index.html. Every section is a function `section(r: ReportData) -> list[Block]`; a block is a
heading, a paragraph, a list, a table or a figure, so both renderings hold the same content
in the same order and every table goes through the one formatter `fmt`."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class ReportData:
    """What every section reads."""

    df: pd.DataFrame  # every curve row of the runs that did not fail (load_curves' columns)
    picked: pd.DataFrame  # the headline tasks (and the utility task), each on its headline metric
    refs: dict  # per task, the reference model's pre-attack score
    table: pd.DataFrame  # summary_table: one row per model x attack x task
    worst: pd.DataFrame  # worst_case over the attack settings, per model x task x budget
    out: Path  # the report folder (sections write their CSVs here)
    records: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-question records of the target tasks
    paired_curves: pd.DataFrame = field(default_factory=pd.DataFrame)  # paired.paired_curves of those records
    x: str = "steps"
    metric: str | None = None
    utility_task: str | None = None
    max_utility_drop: float | None = None
    failed: dict = field(default_factory=dict)  # {run: error} of the runs left out
    warnings: list = field(default_factory=list)  # step-0 mismatches with published scores
    search: pd.DataFrame | None = None  # search trials (report/search.py), None without a search


@dataclass
class Block:
    heading: str | None = None
    level: int = 2
    text: str | None = None
    items: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # files in the report folder
    table: pd.DataFrame | None = None
    figure: str | None = None  # a PNG file in the report folder (written by `figure`)
    alert: bool = False  # drawn in a red frame in HTML
    in_markdown: bool = False  # recovery.md holds the verdict and where to read on; the page holds all


def fmt(v):
    """Every number of every report table: integers with thousands separators, other floats to
    3 decimals, NaN blank."""
    if v is pd.NA:  # a blank in an integer column
        return ""
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return f"{v:,}" if abs(v) >= 1e4 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if v.is_integer() and abs(v) >= 2:  # steps, tokens, counts
            return f"{v:,.0f}"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.3f}"
    return v


def pyplot():
    """matplotlib's pyplot on the file backend (reports are drawn on machines without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    # labels are names (a model "$5$-filter"), never formulas: two $ would be parsed as mathtext
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def figure(fig, out: Path, name: str) -> str:
    """Save a matplotlib figure as out/name (PNG) and close it; returns the file name. Labels in
    the name (a module:function reward, a slash) become dashes."""
    name = re.sub(r"[^\w.-]", "-", name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # the legend beside the axes is part of the figure
    pyplot().close(fig)
    (out / name).write_bytes(buf.getvalue())
    return name


def _md(text) -> str:
    """Text for markdown, with HTML in labels made inert (a renderer would run a <script> label)."""
    return html.escape(str(text), quote=False)


def markdown(blocks: list[Block]) -> str:
    lines = []
    for b in (b for b in blocks if b.in_markdown):
        if b.heading:
            lines += ["#" * b.level + " " + _md(b.heading), ""]
        if b.text:
            lines += [_md(b.text), ""]
        if b.items:
            lines += [*(f"- {_md(i)}" for i in b.items), ""]
        if b.links:
            lines += [*(f"- [{name}]({name})" for name in b.links), ""]
        if b.table is not None and len(b.table):
            lines += [b.table.map(lambda v: _md(fmt(v))).to_markdown(index=False), ""]
        if b.figure:
            lines += [f"![{b.heading or b.figure}]({b.figure})", ""]
    return "\n".join(lines)


def page(blocks: list[Block], out: Path, title: str = "Recovery report") -> str:
    parts = []
    for b in blocks:
        p = []
        if b.heading:
            style = " style='color:#c00'" if b.alert else ""
            p.append(f"<h{b.level}{style}>{html.escape(b.heading)}</h{b.level}>")
        if b.text:
            p.append(f"<p>{html.escape(b.text)}</p>")
        if b.items:
            p.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in b.items) + "</ul>")
        if b.links:
            p.append("<p>" + " &middot; ".join(f"<a href='{html.escape(n)}'>{html.escape(n)}</a>" for n in b.links) + "</p>")
        if b.table is not None and len(b.table):
            p.append(f"<div class='wide'>{b.table.map(fmt).to_html(index=False)}</div>")
        if b.figure:
            data = base64.b64encode((out / b.figure).read_bytes()).decode()
            p.append(f"<img alt='{html.escape(b.figure)}' src='data:image/png;base64,{data}'/>")
        part = "".join(p)
        parts.append(f"<div style='border:3px solid #c00;padding:0 1em'>{part}</div>" if b.alert else part)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;max-width:22em;overflow-wrap:break-word}"
             ".wide{max-width:100%;overflow-x:auto}img{max-width:100%}")  # a wide table scrolls, not the page
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
            + "\n".join(parts))
