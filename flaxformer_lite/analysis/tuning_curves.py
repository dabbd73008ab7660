"""The tuning stage of a tuned sweep in the report: the validation metric against the
tuned value, one line per group, the chosen point marked, and the choices as a table.
Read from the sweep's `tuning.json` (written by the sweep runner; see sweep/tuning.py)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from flaxformer_lite.analysis import plots
from flaxformer_lite.analysis.tables import fmt, markdown_table

TUNING_FILE = 'tuning.json'


def read(paths: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(sweep name, tuning record) for every given sweep workdir that holds a tuning.json."""
    out = []
    for path in paths:
        file = os.path.join(path, TUNING_FILE)
        if os.path.isfile(file):
            with open(file) as f:
                out.append((os.path.basename(os.path.normpath(path)), json.load(f)))
    return out


def _label(group: dict[str, Any]) -> str:
    return ', '.join(f'{k.split(".")[-1]}={v}' for k, v in group.items())


def plot(records: Sequence[tuple[str, dict[str, Any]]]):
    """One panel per sweep: metric against the tuned value (log x for a positive grid)."""
    fig, axes = plots.panels(len(records))
    for ax, (name, record) in zip(axes, records):
        positive = True
        for group in record['groups']:
            xs = [row[0] for row in group['curve']]
            ys = [row[1] for row in group['curve']]
            positive &= all(isinstance(x, (int, float)) and x > 0 for x in xs)
            line, = ax.plot(xs, ys, marker='o', label=_label(group['group']))
            best = next(row for row in group['curve'] if row[0] == group['chosen'])
            ax.plot([best[0]], [best[1]], marker='*', markersize=16, color=line.get_color(),
                    markeredgecolor='black', linestyle='none')
        if positive:
            ax.set_xscale('log')
        ax.set(xlabel=record['field'], ylabel=f"{record['metric']} (mean over {record['seeds']} seed(s))",
               title=f'{name}: tuning stage (star: chosen)')
        ax.grid(alpha=0.3)
        plots.legend(ax)
    plots.finish(fig, 'Tuning curves: the validation metric against the tuned value, per group')
    return fig


def section(records: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown: the choice per group, with the flag of a choice left at the grid's edge."""
    lines = ['## Tuning stage', '']
    for name, record in records:
        lines += [f"`{name}`: {record['field']} chosen per group on {record['metric']} "
                  f"({'lower' if record['lower_is_better'] else 'higher'} is better, mean over {record['seeds']} "
                  f"tuning seed(s)); the test split is never read for it. Curves: "
                  f"[tuning_curves.png](tuning_curves.png).", '']
        rows = []
        for group in record['groups']:
            tried = ', '.join(f'{fmt(v)}: {m:.4g}' for v, m, _ in group['curve'])
            flag = 'at the edge of the grid' if group['at_edge'] else ''
            if group['extended']:
                flag = (flag + ' after extending it' if flag else 'inside after one extension')
            rows.append([_label(group['group']), fmt(group['chosen']), tried, flag])
        lines += [markdown_table(['group', 'chosen', 'tried (value: metric)', 'note'], rows), '']
    return lines
