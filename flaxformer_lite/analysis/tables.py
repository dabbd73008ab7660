"""Tables of runs: one row per trial, seed aggregates, and the number formatting they share.

Rows keep raw values (CSV and JSON are for machines); `fmt` turns a value into the short
text a Markdown table shows (4 significant digits, parameter counts as 812k / 4.7M).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from flaxformer_lite.analysis.runs import SEED_FIELDS, Run, hashable, varying_fields

NUMBER_COLUMNS = ('params_total', 'params_non_embedding', 'tokens', 'train_flops', 'wall_s')
COUNT_KEYS = ('params_total', 'params_embedding', 'params_non_embedding', 'tokens', 'tokens_per_example')


def field_value(run: Run, field: str) -> Any:
    """A column of a run: 'sweep', 'name', 'status', or anything `Run.value` knows."""
    if field == 'sweep':
        return run.sweep or ''
    if field in ('name', 'status', 'workdir'):
        return getattr(run, field)
    return run.value(field)


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit('/', 1)[-1]
    return any(word in leaf for word in ('loss', 'mse', 'error', 'perplexity', 'bpc'))


def metric_keys(runs: Sequence[Run]) -> list[str]:
    """Every final metric the runs report: eval/ before test/, headline metrics
    ('test/accuracy') before breakdowns ('test/dep_64/accuracy'), then by name."""
    keys = {k for r in runs for k in r.metrics}
    return sorted(keys, key=lambda k: (k.count('/') > 1, not k.startswith('eval/'), k))


def best_keys(runs: Sequence[Run]) -> list[str]:
    keys = {k for r in runs for k in (r.record.get('best') or {})}
    return [f'best/{k}' for k in sorted(keys, key=lambda k: (k.count('/') > 1, k))]


def headline_metrics(runs: Sequence[Run]) -> list[str]:
    """The metrics a summary table shows: test/* (eval/* where no run has test metrics),
    without per-length breakdowns."""
    keys = [k for k in metric_keys(runs) if k.count('/') == 1]
    test = [k for k in keys if k.startswith('test/')]
    return test or [k for k in keys if k.startswith('eval/')]


def several_sources(runs: Sequence[Run]) -> bool:
    return len({r.sweep for r in runs}) > 1


def table_fields(runs: Sequence[Run]) -> list[str]:
    """The leading columns of a row: the sweep (if runs come from several) and the swept values."""
    return (['sweep'] if several_sources(runs) else []) + varying_fields(runs)


def trial_rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): one row per trial, swept values first, then status, final metrics,
    best values, sizes and cost, then the trial's name and workdir."""
    columns = (table_fields(runs) + ['status'] + metric_keys(runs) + best_keys(runs)
               + list(NUMBER_COLUMNS) + ['name', 'workdir'])
    return columns, [{c: field_value(r, c) for c in columns} for r in runs]


def group_fields(runs: Sequence[Run], group: Sequence[str] | None = None) -> list[str]:
    """What seeds are aggregated over: `group`, or every varying field but the seeds."""
    fields = list(group) if group is not None else table_fields(runs)
    return [f for f in fields if f not in SEED_FIELDS]


@dataclasses.dataclass
class Group:
    """Runs that differ only in their seeds, with stats per metric."""
    values: dict[str, Any]
    runs: list[Run]
    stats: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return dict(group=self.values, n_runs=len(self.runs), metrics=self.stats)


def summarize(values: Iterable[float]) -> dict[str, float] | None:
    """mean, std (ddof=1 when n > 1, else 0), min, max, n of the finite values."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(x):
        return None
    return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                min=float(x.min()), max=float(x.max()), n=int(len(x)))


def bounds(metric: str) -> tuple[float, float]:
    """The range a metric can take: [0, 1] for accuracies and exact match, [0, inf) for
    losses, squared errors and perplexities, else unbounded."""
    leaf = metric.rsplit('/', 1)[-1]
    if 'accuracy' in leaf or 'exact_match' in leaf:
        return 0.0, 1.0
    if 'loss' in leaf or 'mse' in leaf or 'perplexity' in leaf:
        return 0.0, math.inf
    return -math.inf, math.inf


def rerun_interval(stats: Mapping[str, float] | None, metric: str, m: int | None = None,
                   level: float = 95.0) -> tuple[float, float] | None:
    """Where the mean of a rerun with `m` other seeds (default: as many as these) should
    fall, at `level`%: the Student-t prediction interval mean ± t(n-1) · s · sqrt(1/n + 1/m),
    clipped to the metric's range. None below two seeds (no spread to go by). It is the
    spread a rerun is held to: wide where seeds disagree, a point where they all agree."""
    if not stats or stats['n'] < 2:
        return None
    from scipy import stats as scipy_stats  # scipy is heavy: imported when a report is written
    n, m = int(stats['n']), int(m or stats['n'])
    half = float(scipy_stats.t.ppf(0.5 + level / 200.0, n - 1)) * stats['std'] * math.sqrt(1.0 / n + 1.0 / m)
    lo, hi = bounds(metric)
    return max(lo, stats['mean'] - half), min(hi, stats['mean'] + half)


def fmt_interval(interval: tuple[float, float] | None) -> str:
    return '' if interval is None else f'[{fmt(interval[0])}, {fmt(interval[1])}]'


def group_runs(runs: Sequence[Run], by: Sequence[str]) -> dict[tuple, list[Run]]:
    """Runs keyed by their values of `by`, in first-seen order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(hashable(field_value(run, f)) for f in by), []).append(run)
    return groups


def aggregate(runs: Sequence[Run], by: Sequence[str], keys: Sequence[str] | None = None) -> list[Group]:
    """One Group per combination of `by` among the finished runs, stats for each key."""
    done = [r for r in runs if r.status == 'done']
    if keys is None:
        keys = metric_keys(done) + best_keys(done) + list(NUMBER_COLUMNS)
    out = []
    for values, members in group_runs(done, by).items():
        stats = {k: s for k in keys if (s := summarize(r.number(k) for r in members)) is not None}
        out.append(Group(dict(zip(by, values)), members, stats))
    return out


def keep_best_tuned(runs: Sequence[Run], tuned: Sequence[str], by: Sequence[str], metric: str) -> list[Run]:
    """Within each combination of `by`, only the runs of the `tuned` values (for example
    the learning rate) whose mean `metric` over seeds is best: one tuned point per setting."""
    if not tuned:
        return list(runs)
    sign = 1.0 if lower_is_better(metric) else -1.0
    kept = []
    for members in group_runs(runs, by).values():
        options = group_runs(members, tuned)
        scored = [(sign * s['mean'], i) for i, opt in enumerate(options.values())
                  if (s := summarize(r.number(metric) for r in opt)) is not None]
        if scored:
            kept.extend(list(options.values())[min(scored)[1]])
    return kept


def _si(x: float) -> str:
    for scale, suffix in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= scale:
            return f'{x / scale:.3g}{suffix}'
    return f'{x:.0f}'


def fmt(value: Any, key: str = '') -> str:
    """Short, stable text for a table cell ('' for missing values)."""
    if value is None:
        return ''
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, np.integer, np.floating)):
        x = float(value)
        if not math.isfinite(x):
            return str(x)
        if key in COUNT_KEYS:
            return _si(x)
        if 'flops' in key:
            return f'{x:.3g}'
        if key.endswith('wall_s'):
            return f'{x:.1f}'
        if isinstance(value, (int, np.integer)) and abs(x) < 1e6:
            return str(int(value))
        return '0' if x == 0 else f'{x:.4g}'
    if isinstance(value, (list, tuple)):
        return '(' + ', '.join(fmt(v) for v in value) + ')'
    return str(value)


def fmt_stats(stats: Mapping[str, float] | None, key: str = '', n_runs: int | None = None) -> str:
    """'0.512 ± 0.013': the std to 2 significant digits, left out where it is 0 (a size
    shared by every seed); '(n=2)' when fewer runs than the group holds report the key."""
    if not stats:
        return ''
    text = fmt(stats['mean'], key)
    if stats['n'] > 1 and stats['std'] > 0:
        std = stats['std']
        text += f' ± {fmt(std, key) if key in COUNT_KEYS or "flops" in key else f"{std:.2g}"}'
    if n_runs is not None and stats['n'] != n_runs:
        text += f' (n={stats["n"]})'
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace('|', '\\|').replace('\n', ' ')
    lines = ['| ' + ' | '.join(cell(h) for h in header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(cell(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def trials_markdown(runs: Sequence[Run]) -> str:
    """The per-trial table, headline columns only (results.csv has them all)."""
    fields = table_fields(runs)
    metrics = [k for k in metric_keys(runs) if k.count('/') == 1]
    columns = fields + ['status'] + metrics + ['params_non_embedding', 'train_flops', 'wall_s']
    if not fields:
        columns = ['name'] + columns
    rows = [[fmt(field_value(r, c), c) for c in columns] for r in runs]
    return markdown_table(columns, rows)


def interval_column(metric: str, level: float = 95.0) -> str:
    return f'{metric} rerun {level:g}%'


def groups_markdown(groups: Sequence[Group], by: Sequence[str], metrics: Sequence[str],
                    interval: str | None = None, level: float = 95.0) -> str:
    """The seed-aggregated table: mean ± std per metric, and how many runs each row holds;
    with `interval` (a metric), a column of that metric's `rerun_interval` after it."""
    metrics = list(metrics)
    columns = list(by) + ['runs'] + metrics + ['params_non_embedding', 'train_flops']
    if interval:
        columns.insert(columns.index(interval) + 1 if interval in columns else len(by) + 1,
                       interval_column(interval, level))
    rows = []
    for g in groups:
        n = len(g.runs)
        rows.append([fmt(g.values[f], f) for f in by] + [str(n)]
                    + [fmt_interval(rerun_interval(g.stats.get(interval), interval, level=level))
                       if interval and k == interval_column(interval, level) else fmt_stats(g.stats.get(k), k, n)
                       for k in columns[len(by) + 1:]])
    return markdown_table(columns, rows)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    def raw(v: Any) -> Any:
        return '' if v is None else repr(v) if isinstance(v, float) else v
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([raw(row.get(c)) for c in columns])


def groups_csv_rows(groups: Sequence[Group], by: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat columns for the aggregate CSV: the group values, n_runs, then KEY/mean ... KEY/n."""
    keys: list[str] = []
    for g in groups:
        keys.extend(k for k in g.stats if k not in keys)
    columns = list(by) + ['n_runs'] + [f'{k}/{s}' for k in keys for s in ('mean', 'std', 'min', 'max', 'n')]
    rows = []
    for g in groups:
        row: dict[str, Any] = {**g.values, 'n_runs': len(g.runs)}
        for k, st in g.stats.items():
            row.update({f'{k}/{s}': v for s, v in st.items()})
        rows.append(row)
    return columns, rows
