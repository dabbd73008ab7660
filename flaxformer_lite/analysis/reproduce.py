"""Do sweeps that differ only in their seeds agree? The check a rerun is held to.

A report over several sweeps of the same settings (`--report --workdir=A,B`, say the
quick form run with seeds 0-2 and again with `first_seed=3`) gets a section that puts
each setting's means side by side and asks, both ways, whether one sweep's mean lies
inside the other's `tables.rerun_interval`: the Student-t prediction interval for the
mean of a rerun with that many seeds. About 95 in 100 settings should pass each check
when seeds are the only difference and the t model holds; a setting that fails both
ways differs by more than its seeds explain. Bimodal settings (runs that either solve a
task or stay at chance) are where few seeds say least: their intervals are wide, and
the table shows it instead of hiding it behind a mean ± std.
"""

from __future__ import annotations

from typing import Any, Sequence

from flaxformer_lite.analysis import tables
from flaxformer_lite.analysis.runs import Run


def _inside(x: float, interval: tuple[float, float] | None) -> bool | None:
    if interval is None:
        return None
    # Relative slack of float rounding: a mean equal to a zero-width interval is inside.
    slack = 1e-9 * max(1.0, abs(x))
    return interval[0] - slack <= x <= interval[1] + slack


def compare(runs: Sequence[Run], by: Sequence[str], metric: str, level: float = 95.0) -> list[dict[str, Any]]:
    """One row per setting (values of `by`, 'sweep' and seeds excluded) that two or more
    sweeps ran, for each sweep after the first (the reference): both means, seed counts,
    the interval each sets for the other's mean, and whether each mean lies inside."""
    by = [f for f in by if f != 'sweep']
    done = [r for r in runs if r.status == 'done' and r.sweep is not None]
    rows = []
    for values, members in tables.group_runs(done, by).items():
        per_sweep = tables.group_runs(members, ['sweep'])
        if len(per_sweep) < 2:
            continue
        stats = {sweep: tables.summarize(r.number(metric) for r in rs) for (sweep,), rs in per_sweep.items()}
        stats = {k: v for k, v in stats.items() if v is not None}
        names = list(stats)
        ref = names[0] if names else None
        for other in names[1:]:
            a, b = stats[ref], stats[other]
            in_a = tables.rerun_interval(a, metric, m=b['n'], level=level)
            in_b = tables.rerun_interval(b, metric, m=a['n'], level=level)
            rows.append({**dict(zip(by, values)), 'metric': metric, 'reference': ref, 'rerun': other,
                         'reference_mean': a['mean'], 'reference_n': a['n'], 'reference_interval': in_a,
                         'rerun_mean': b['mean'], 'rerun_n': b['n'], 'rerun_interval': in_b,
                         'rerun_inside_reference': _inside(b['mean'], in_a),
                         'reference_inside_rerun': _inside(a['mean'], in_b)})
    return rows


def _yes(flag: bool | None) -> str:
    return 'n/a' if flag is None else 'yes' if flag else '**no**'


def section(rows: Sequence[dict[str, Any]], by: Sequence[str], metric: str, level: float = 95.0,
            first: bool = True) -> list[str]:
    """report.md's 'Reproduction across sweeps' for `metric` (nothing when no setting was
    run twice); a report checking several metrics gives each after the first its own heading."""
    if not rows:
        return []
    by = [f for f in by if f != 'sweep']
    checked = [r for r in rows if r['rerun_inside_reference'] is not None]
    forward = sum(bool(r['rerun_inside_reference']) for r in checked)
    backward = sum(bool(r['reference_inside_rerun']) for r in rows if r['reference_inside_rerun'] is not None)
    both = [r for r in checked if not r['rerun_inside_reference'] and r['reference_inside_rerun'] is False]
    lines = ['## Reproduction across sweeps' + ('' if first else f': {metric}'), '',
             f'Each setting run by two sweeps: its `{metric}` mean in each, and the {level:g}% interval each '
             f'sets for the other\'s mean (Student-t prediction interval for the mean of a rerun with that many '
             f'seeds, clipped to the metric\'s range). With seeds the only difference, about {level:g} in 100 '
             f'settings should pass each check.', '',
             f'- rerun\'s mean inside the reference\'s interval: {forward} of {len(checked)} settings',
             f'- reference\'s mean inside the rerun\'s interval: {backward} of '
             f'{sum(r["reference_inside_rerun"] is not None for r in rows)} settings',
             f'- outside both ways: {len(both)}' + (': ' + '; '.join(
                 ', '.join(tables.fmt(r[f], f) for f in by) for r in both) if both else ''), '']
    header = by + ['reference', 'ref. mean', 'ref. interval', 'rerun', 'rerun mean', 'rerun interval',
                   'rerun inside ref.', 'ref. inside rerun']
    body = [[tables.fmt(r[f], f) for f in by]
            + [f'{r["reference"]} (n={r["reference_n"]})', tables.fmt(r['reference_mean']),
               tables.fmt_interval(r['reference_interval']), f'{r["rerun"]} (n={r["rerun_n"]})',
               tables.fmt(r['rerun_mean']), tables.fmt_interval(r['rerun_interval']),
               _yes(r['rerun_inside_reference']), _yes(r['reference_inside_rerun'])] for r in rows]
    return lines + [tables.markdown_table(header, body)]
