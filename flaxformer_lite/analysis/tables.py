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

from flaxformer_lite.analysis.runs import CONVERGENCE, SEED_FIELDS, Run, hashable, varying_fields
from flaxformer_lite.errors import UserError

NUMBER_COLUMNS = ('params_total', 'params_non_embedding', 'tokens', 'train_flops', 'wall_s')
COUNT_KEYS = ('params_total', 'params_embedding', 'params_non_embedding', 'tokens', 'tokens_per_example')


def field_value(run: Run, field: str) -> Any:
    """A column of a run: 'sweep', 'name', 'status', 'convergence' (finished runs), or
    anything `Run.value` knows."""
    if field == 'sweep':
        return run.sweep or ''
    if field == 'convergence':
        return run.convergence if run.status == 'done' else None
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
    """(columns, rows): one row per trial, swept values first, then status and convergence,
    final metrics, best values, sizes and cost, then the trial's name and workdir."""
    columns = (table_fields(runs) + ['status', 'convergence'] + metric_keys(runs) + best_keys(runs)
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

    @property
    def convergence(self) -> dict[str, int]:
        """How many of the runs are converged, still_improving, unknown."""
        return {c: sum(r.convergence == c for r in self.runs) for c in CONVERGENCE}

    def to_dict(self) -> dict[str, Any]:
        return dict(group=self.values, n_runs=len(self.runs), convergence=self.convergence, metrics=self.stats)


STILL_IMPROVING_MARK = '†'


def fmt_convergence(counts: Mapping[str, int]) -> str:
    """'3/3': runs converged of the row's runs; '2/3 †': one still improving; '2/3 (1
    unknown)': one without a verdict; 'unknown' where no run has one."""
    n = sum(counts.values())
    if counts.get('unknown', 0) == n:
        return 'unknown'
    text = f"{counts.get('converged', 0)}/{n}"
    if counts.get('still_improving', 0):
        text += f' {STILL_IMPROVING_MARK}'
    if counts.get('unknown', 0):
        text += f" ({counts['unknown']} unknown)"
    return text


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


def validation_metric(metric: str) -> str:
    """The metric that chooses wherever `metric` is reported: its validation twin
    (test/accuracy -> eval/accuracy, test/dep_64/accuracy -> eval/dep_64/accuracy); an
    eval/ (or best/eval/) metric is its own. The test split never chooses anything."""
    for test, val in (('test/', 'eval/'), ('best/test/', 'best/eval/')):
        if metric.startswith(test):
            return val + metric[len(test):]
    if metric.startswith(('eval/', 'best/eval/')):
        return metric
    raise UserError(f'--report: {metric!r} has no validation metric to choose by; name an eval/ or test/ metric')


def validation_score(runs: Sequence[Run], metric: str, chooses: str, chosen: set | None = None) -> float:
    """The mean over `runs` (the seeds of one candidate) of `metric`'s validation twin,
    signed so that lower is better. A run without it is an error, never a fallback to
    test. `chosen` (when given) collects (what was chosen, `metric`) for the report."""
    chooser = validation_metric(metric)
    values = []
    for run in runs:
        value = run.number(chooser)
        if value is None:
            raise UserError(f'--report: run {run.name} ({run.workdir}) reports no {chooser}, which chooses '
                            f'{chooses} for {metric}; evaluate it again with --eval_only --workdir={run.workdir}')
        values.append(value)
    if chosen is not None:
        chosen.add((chooses, metric))
    return (1.0 if lower_is_better(chooser) else -1.0) * float(np.mean(values))


def keep_best_tuned(runs: Sequence[Run], tuned: Sequence[str], by: Sequence[str], metric: str,
                    chosen: set | None = None) -> list[Run]:
    """Within each combination of `by`, only the runs (every seed) of the `tuned` values
    (for example the learning rate) whose mean over seeds of the validation twin of
    `metric` is best: one tuned point per setting, chosen on validation, whose reported
    `metric` (a test one) is then that of the chosen runs."""
    if not tuned:
        return list(runs)
    kept = []
    for members in group_runs(runs, by).values():
        options = list(group_runs(members, tuned).values())
        if len(options) > 1:
            scores = [validation_score(opt, metric, ', '.join(tuned), chosen) for opt in options]
            options = [options[int(np.argmin(scores))]]  # ties: the first seen
        kept.extend(options[0])
    return kept


def selection_line(chosen: set) -> str | None:
    """report.md's line saying what chose each best value the report kept (None: none kept)."""
    if not chosen:
        return None
    parts = []
    for what, metric in sorted(chosen):
        shown = '' if validation_metric(metric) == metric else f', showing their `{metric}`'
        parts.append(f'{what} by `{validation_metric(metric)}`{shown}')
    return ('- best values kept, chosen on the validation split (a tuned value: the best mean over its seeds, all '
            'of them kept): ' + '; '.join(parts) + '; the test split chooses nothing')


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
    columns = fields + ['status', 'convergence'] + metrics + ['params_non_embedding', 'train_flops', 'wall_s']
    if not fields:
        columns = ['name'] + columns
    rows = [[fmt(field_value(r, c), c) for c in columns] for r in runs]
    return markdown_table(columns, rows)


def interval_column(metric: str, level: float = 95.0) -> str:
    return f'{metric} rerun {level:g}%'


def groups_markdown(groups: Sequence[Group], by: Sequence[str], metrics: Sequence[str],
                    interval: str | None = None, level: float = 95.0) -> str:
    """The seed-aggregated table: mean ± std per metric, how many runs each row holds and
    how many of them had converged (`fmt_convergence`: † where one was still improving);
    with `interval` (a metric), a column of that metric's `rerun_interval` after it."""
    metrics = list(metrics)
    columns = list(by) + ['runs', 'converged'] + metrics + ['params_non_embedding', 'train_flops']
    if interval:
        columns.insert(columns.index(interval) + 1 if interval in columns else len(by) + 2,
                       interval_column(interval, level))
    rows = []
    for g in groups:
        n = len(g.runs)
        rows.append([fmt(g.values[f], f) for f in by] + [str(n), fmt_convergence(g.convergence)]
                    + [fmt_interval(rerun_interval(g.stats.get(interval), interval, level=level))
                       if interval and k == interval_column(interval, level) else fmt_stats(g.stats.get(k), k, n)
                       for k in columns[len(by) + 2:]])
    return markdown_table(columns, rows)


def convergence_legend(runs: Sequence[Run]) -> str:
    """report.md's line under the aggregated table: what `converged` and † mean, and the
    rule the runs recorded."""
    rules = sorted({c['rule'] for r in runs if r.status == 'done' and isinstance(c := r.record.get('convergence'),
                                                                                   Mapping) and c.get('rule')})
    text = (f'`converged`: how many of the row\'s runs had stopped improving on the validation loss by the end of '
            f'training; {STILL_IMPROVING_MARK} marks a row where a run was still improving (its values may still '
            f'move with more steps); unknown: too few evaluations in the last quarter of training, or a record '
            f'older than the check.')
    return text + (f' Rule: {"; ".join(rules)}.' if rules else '')


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    def raw(v: Any) -> Any:
        return '' if v is None else repr(v) if isinstance(v, float) else v
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([raw(row.get(c)) for c in columns])


def groups_csv_rows(groups: Sequence[Group], by: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat columns for the aggregate CSV: the group values, n_runs, the runs converged,
    still improving and unknown, then KEY/mean ... KEY/n."""
    keys: list[str] = []
    for g in groups:
        keys.extend(k for k in g.stats if k not in keys)
    counts = [f'n_{c}' for c in CONVERGENCE]
    columns = (list(by) + ['n_runs'] + counts
               + [f'{k}/{s}' for k in keys for s in ('mean', 'std', 'min', 'max', 'n')])
    rows = []
    for g in groups:
        row: dict[str, Any] = {**g.values, 'n_runs': len(g.runs),
                               **{f'n_{c}': k for c, k in g.convergence.items()}}
        for k, st in g.stats.items():
            row.update({f'{k}/{s}': v for s, v in st.items()})
        rows.append(row)
    return columns, rows
