"""Task plots: a metric against a swept field (accuracy against dependency length), length
generalisation (accuracy at evaluated lengths of runs trained at one length), loss
against position in the context, and learning curves (an eval metric against the step).

Lines are one per `group` (default family and size) and per any other swept field that
is not the x axis (or set by it, like `task.seq_len` from the dependency length), a
seed, or a tuned field (swept `optim.*`: each point keeps the value best on the validation
twin of the metric, `tables.keep_best_tuned`); points are means over seeds with error bars
(std, or min to max).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from flaxformer_lite.analysis.plots import LINESTYLES, MARKERS, Skip, finish, loss_unit, panel_legends, panels
from flaxformer_lite.analysis.runs import SEED_FIELDS, Run, hashable, varying_fields
from flaxformer_lite.analysis.tables import fmt, group_runs, keep_best_tuned, summarize


def _follows(runs: Sequence[Run], field: str, axis: str) -> bool:
    """Whether `field` is a function of `axis` in these runs (task.seq_len set from the
    dependency length, say): it then moves along the line instead of splitting it."""
    seen: dict[Any, Any] = {}
    return all(seen.setdefault(hashable(r.value(axis)), hashable(r.value(field))) == hashable(r.value(field))
               for r in runs)


def _line_fields(runs: Sequence[Run], group: Sequence[str], exclude: Sequence[str]) -> list[str]:
    fields = list(group)
    for f in varying_fields(runs):
        if f not in fields and f not in exclude and f not in SEED_FIELDS and not f.startswith('optim.') \
                and f != 'sweep' and len({hashable(r.value(f)) for r in runs}) > 1 \
                and not any(_follows(runs, f, axis) for axis in exclude):
            fields.append(f)
    return fields


def _line_label(fields: Sequence[str], values: Sequence[Any]) -> str:
    parts = []
    for f, v in zip(fields, values):
        shown = 'none' if v is None else fmt(v, f)
        parts.append(str(v) if f in ('model.name', 'model.size') else f'{f.rsplit(".", 1)[-1]}={shown}')
    return ' '.join(parts)


def _styles(lines: dict[tuple, list[Run]], fields: Sequence[str]) -> dict[tuple, tuple[str, str]]:
    """(marker, linestyle) per line: by size rank within its family, smallest first."""
    fam = fields.index('model.name') if 'model.name' in fields else None
    ranked: dict[Any, list[tuple[float, tuple]]] = {}
    for key, members in lines.items():
        size = np.mean([r.number('params_non_embedding') or 0 for r in members])
        ranked.setdefault(key[fam] if fam is not None else None, []).append((size, key))
    out = {}
    for items in ranked.values():
        for i, (_, key) in enumerate(sorted(items, key=lambda t: t[0])):
            out[key] = (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
    return out


def _color(key: tuple, fields: Sequence[str], colors: dict):
    if 'model.name' in fields:
        return colors.get(key[fields.index('model.name')], 'gray')
    return None


def _errorbar(ax, xs, stats, error: str, **kw) -> None:
    mean = np.array([s['mean'] for s in stats])
    if error == 'minmax':
        yerr = np.array([[s['mean'] - s['min'] for s in stats], [s['max'] - s['mean'] for s in stats]])
    else:
        yerr = np.array([s['std'] for s in stats])
    ax.errorbar(xs, mean, yerr=yerr, capsize=3, ms=5, lw=1.4, **kw)


UNITS = {'task.dependency_length': 'tokens', 'task.seq_len': 'tokens', 'train.steps': 'steps',
         'train.batch_size': 'examples'}


def _x_axis(ax, xs: Sequence[float], label: str) -> None:
    xs = [x for x in xs if x is not None]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale('log', base=2)
        ticks = sorted(set(xs))
        ax.set_xticks(ticks, [fmt(t) for t in ticks])
    ax.set_xlabel(label)


def _y_axis(ax, metric: str, runs: Sequence[Run]) -> None:
    leaf = metric.rsplit('/', 1)[-1]
    ax.set_ylabel(metric + (loss_unit(runs) if 'loss' in leaf else ''))
    if 'accuracy' in leaf or 'exact_match' in leaf:
        ax.set_ylim(-0.02, 1.02)


def _chance(ax, runs: Sequence[Run], metric: str, x_of) -> None:
    """The chance level of `metric` (from results.json "chance"), dashed, against x."""
    leaf = metric.rsplit('/', 1)[-1]
    points: dict[float, list[float]] = {}
    for r in runs:
        c = (r.record.get('chance') or {}).get(leaf)
        if isinstance(c, (int, float)) and x_of(r) is not None:
            points.setdefault(x_of(r), []).append(float(c))
    if not points:
        return
    values = {round(v, 9) for vs in points.values() for v in vs}
    if len(values) == 1:
        ax.axhline(values.pop(), color='gray', ls='--', lw=1, label='chance')
    else:
        xs = sorted(points)
        ax.plot(xs, [np.mean(points[x]) for x in xs], color='gray', ls='--', lw=1, label='chance')


def _panelled(done: Sequence[Run], panel_by: Sequence[str], fields: Sequence[str], colors: dict, title: str,
              draw: Callable[..., None], decorate: Callable[..., None], **panel_size) -> Figure:
    """The figure every per-group plot shares: one panel per value of `panel_by`, one
    line per value of `fields` (its colour and marker fixed across panels), drawn by
    `draw(ax, line_runs, label=..., color=..., marker=..., ls=...)`, then
    `decorate(ax, panel, members)`; a grid, the title and one legend per panel."""
    by_panel = group_runs(done, panel_by)
    fig, axes = panels(len(by_panel), **panel_size)
    for ax, (panel, members) in zip(axes, by_panel.items()):
        lines = group_runs(members, fields)
        styles = _styles(lines, fields)
        for key, line in lines.items():
            marker, ls = styles[key]
            draw(ax, line, label=_line_label(fields, key), color=_color(key, fields, colors), marker=marker, ls=ls)
        decorate(ax, panel, members)
        ax.grid(alpha=0.3)
    finish(fig, title)
    panel_legends(fig, axes)
    return fig


def plot_metric_vs_x(runs: Sequence[Run], metric: str, x: str, group: Sequence[str], colors: dict, *,
                     error: str = 'std', chosen: set | None = None) -> Figure:
    """`metric` against config field `x`, one panel per task, one line per group."""
    done = [r for r in runs if r.status == 'done' and r.number(metric) is not None and r.number(x) is not None]
    if len({r.number(x) for r in done}) < 2:
        raise Skip(f'the finished runs report {metric} at fewer than two values of {x}')
    panel_by = ['task.name'] if len({r.config.get('task.name') for r in done}) > 1 else []
    fields = _line_fields(done, group, [x] + panel_by)
    tuned = [f for f in varying_fields(done) if f.startswith('optim.')]
    done = keep_best_tuned(done, tuned, panel_by + fields + [x], metric, chosen)
    def draw(ax, line, **style):
        by_x = group_runs(line, [x])
        xs = sorted(k[0] for k in by_x)
        _errorbar(ax, xs, [summarize(r.number(metric) for r in by_x[(v,)]) for v in xs], error, **style)

    def decorate(ax, panel, members):
        _chance(ax, members, metric, lambda r: r.number(x))
        _x_axis(ax, [r.number(x) for r in members], f'{x} ({UNITS[x]})' if x in UNITS else x)
        _y_axis(ax, metric, members)
        ax.set_title(str(panel[0]) if panel else None)

    spread = 'min to max' if error == 'minmax' else 'std'
    return _panelled(done, panel_by, fields, colors, f'{metric} against {x} (mean over seeds, bars: {spread})', draw,
                     decorate)


def _dep_pattern(metric: str) -> re.Pattern:
    prefix, _, leaf = metric.rpartition('/')
    return re.compile(rf'^{re.escape(prefix)}/dep_(\d+)/{re.escape(leaf)}$')


def length_points(run: Run, metric: str, x: str = 'task.dependency_length') -> dict[float, float]:
    """{evaluated length: value}: the test/dep_<L>/ metrics plus `metric` at the trained length."""
    pattern = _dep_pattern(metric)
    out = {float(m.group(1)): float(v) for k, v in run.metrics.items()
           if (m := pattern.match(k)) and isinstance(v, (int, float))}
    if out and run.number(metric) is not None and run.number(x) is not None:
        out.setdefault(run.number(x), run.number(metric))
    return out


def plot_length_generalization(runs: Sequence[Run], metric: str, group: Sequence[str], colors: dict, *,
                               x: str = 'task.dependency_length', error: str = 'std',
                               chosen: set | None = None) -> Figure:
    """`metric` at each evaluated dependency length, one panel per (task, trained length)."""
    done = [r for r in runs if r.status == 'done' and len(length_points(r, metric, x)) >= 2]
    if not done:
        prefix, _, leaf = metric.rpartition('/')
        raise Skip(f'no finished run reports {prefix}/dep_<L>/{leaf} (set eval.dependency_lengths)')
    panel_by = (['task.name'] if len({r.config.get('task.name') for r in done}) > 1 else []) + [x]
    fields = _line_fields(done, group, panel_by)
    tuned = [f for f in varying_fields(done) if f.startswith('optim.')]
    done = keep_best_tuned(done, tuned, panel_by + fields, metric, chosen)
    def draw(ax, line, **style):
        per_run = [length_points(r, metric, x) for r in line]
        xs = sorted({L for p in per_run for L in p})
        _errorbar(ax, xs, [summarize(p.get(L) for p in per_run) for L in xs], error, **style)

    def decorate(ax, panel, members):
        ax.axvline(panel[-1], color='black', ls=':', lw=1, label='trained length')
        _flat_chance(ax, members, metric)
        _x_axis(ax, [L for r in members for L in length_points(r, metric, x)], 'evaluated dependency length (tokens)')
        _y_axis(ax, metric, members)
        ax.set_title(', '.join(f'{f.rsplit(".", 1)[-1]}={fmt(v, f)}' for f, v in zip(panel_by, panel)).replace(
            'dependency_length=', 'trained at length '))

    return _panelled(done, panel_by, fields, colors,
                     f'Length generalisation: {metric} at evaluated lengths (mean over seeds)', draw, decorate)


def _flat_chance(ax, runs: Sequence[Run], metric: str) -> None:
    leaf = metric.rsplit('/', 1)[-1]
    values = [c for r in runs if isinstance(c := (r.record.get('chance') or {}).get(leaf), (int, float))]
    if values:
        ax.axhline(float(np.mean(values)), color='gray', ls='--', lw=1, label='chance')


def plot_loss_by_position(runs: Sequence[Run], colors: dict, *, curve: str = 'test/loss_by_position') -> Figure:
    """Loss against position in the context, the largest model of each family (mean over seeds)."""
    done = [r for r in runs if r.status == 'done' and len((r.record.get('curves') or {}).get(curve) or []) > 1]
    if not done:
        raise Skip(f'no finished run records curves["{curve}"] (only tasks that report loss by position)')
    panel_by = ['task.name'] if len({r.config.get('task.name') for r in done}) > 1 else []
    by_panel = group_runs(done, panel_by)
    fig, axes = panels(len(by_panel), width=6.4, height=4.4)
    for ax, (panel, members) in zip(axes, by_panel.items()):
        fields = [f for f in _line_fields(members, ['model.name'], panel_by) if not f.startswith('model.')
                  or f == 'model.name']
        lines = group_runs(members, fields)
        styles = _styles(lines, fields)
        for key, line in lines.items():
            largest = max(r.number('params_non_embedding') or 0 for r in line)
            chosen = [r for r in line if (r.number('params_non_embedding') or 0) == largest]
            curves = [np.asarray(r.record['curves'][curve], dtype=float) for r in chosen]
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            size = f'{fmt(largest, "params_non_embedding")} params' if largest else 'size unknown'
            ax.plot(np.arange(1, length + 1), mean, color=_color(key, fields, colors), lw=1.5,
                    ls=styles[key][1], label=f'{_line_label(fields, key)} ({size}, '
                                             f'{len(chosen)} run{"s" if len(chosen) > 1 else ""})')
        ax.set(xscale='log', xlabel='position in the context (tokens)',
               ylabel=curve.replace('_by_position', '') + loss_unit(members), title=str(panel[0]) if panel else None)
        ax.grid(alpha=0.3, which='both')
    finish(fig, 'Loss by position in the context (largest model of each family)')
    panel_legends(fig, axes)
    return fig


def plot_learning_curves(runs: Sequence[Run], metric: str, group: Sequence[str], colors: dict) -> Figure:
    """`metric` (an eval/* one, from results.json's `history`) against the training step,
    one panel per task, one line per group: the mean over seeds, shaded from min to max."""
    metric = metric.replace('test/', 'eval/', 1)
    done = [r for r in runs if r.status == 'done' and (r.record.get('history') or {}).get(metric)]
    if not done:
        raise Skip(f'no finished run has a history of {metric} (runs of older versions have none)')
    panel_by = ['task.name'] if len({r.config.get('task.name') for r in done}) > 1 else []
    fields = _line_fields(done, group, ['train.steps'] + panel_by)
    def draw(ax, line, *, label, color, marker, ls):
        curves = [dict((int(s), float(v)) for s, v in r.record['history'][metric]) for r in line]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        ax.plot(steps, values.mean(0), color=color, marker=marker, ls=ls, ms=3, label=f'{label} ({len(line)} runs)')
        if len(line) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)

    def decorate(ax, panel, members):
        _flat_chance(ax, members, metric)
        ax.set_xlabel('training step')
        _y_axis(ax, metric, members)
        ax.set_title(str(panel[0]) if panel else None)

    return _panelled(done, panel_by, fields, colors, f'{metric} during training (mean over seeds, shaded: min to max)',
                     draw, decorate)
