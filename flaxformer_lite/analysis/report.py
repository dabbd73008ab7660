"""The report: tables, fits and plots written to one folder, and report.md tying them together.

`write_report` in `__init__` is the entry point; this module holds the options (what an
experiment may choose), the plot registry and the Markdown.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from flaxformer_lite.analysis import plots, plots_metrics, reproduce, scaling, tables, tuning_curves
from flaxformer_lite.analysis.runs import Run, count_by_status, hashable, load_runs
from flaxformer_lite.errors import UserError

PLOT_TITLES = {
    'loss_vs_params': 'Loss against model size',
    'loss_vs_compute': 'Loss against training compute',
    'isoflop': 'IsoFLOP profiles',
    'optimal_params': 'Compute-optimal model size',
    'accuracy_vs_dependency_length': 'Accuracy against dependency length',
    'length_generalization': 'Length generalisation',
    'loss_by_position': 'Loss by position in the context',
    'learning_curves': 'Learning curves',
}
PLOT_ALIASES = {'scaling': tuple(plots.SCALING_PLOTS)}
OPTION_DEFAULTS: dict[str, Any] = dict(
    title=None, metric=None, loss_metric=None, x='task.dependency_length', plots=None,
    group=('model.name', 'model.size'), table_group=None, tuned=None, error_bars='std',
    bootstrap=200, seed=0, level=95.0, fits=True, choose=None, table_metrics=None,
    reproduce=None)  # the metrics a report over several sweeps checks (default: `metric`)
METRIC_CHOICES = ('test/accuracy', 'eval/accuracy', 'test/exact_match', 'eval/exact_match', 'test/mse', 'eval/mse')


def resolve_options(options: Mapping[str, Any] | None, runs: Sequence[Run]) -> dict[str, Any]:
    """The options with defaults filled in from the data; UserError for keys or plots it does not know."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise UserError(f'report options: unknown key {unknown[0]!r}; known keys: {", ".join(OPTION_DEFAULTS)}')
    out = {**OPTION_DEFAULTS, **options}
    if out['error_bars'] not in ('std', 'minmax'):
        raise UserError(f"report options: error_bars={out['error_bars']!r}; use 'std' or 'minmax'")
    if out['plots'] is not None:
        names: list[str] = []
        for name in ([out['plots']] if isinstance(out['plots'], str) else out['plots']):
            if name not in PLOT_TITLES and name not in PLOT_ALIASES:
                raise UserError(f'report options: unknown plot {name!r}; known plots: '
                                f'{", ".join(list(PLOT_TITLES) + list(PLOT_ALIASES))}')
            names.extend(n for n in PLOT_ALIASES.get(name, (name,)) if n not in names)
        out['plots'] = names
    done = [r for r in runs if r.status == 'done']
    reported = {k for r in done for k in r.metrics}
    if out['loss_metric'] is None:
        out['loss_metric'] = 'test/loss' if 'test/loss' in reported or 'eval/loss' not in reported else 'eval/loss'
    if out['metric'] is None:
        out['metric'] = next((m for m in METRIC_CHOICES if m in reported), 'test/accuracy')
    out['group'] = list(out['group'])
    return out


def _plot_builders(options: Mapping[str, Any], runs: Sequence[Run], fits: Sequence[scaling.Scaling] | None,
                   colors: dict, fits_skip: str, chosen: set) -> dict[str, Callable[[], Any]]:
    def scaling_plot(fn):
        def build():
            if fits is None:
                raise plots.Skip(fits_skip)
            return fn(fits, colors, runs)
        return build
    out: dict[str, Callable[[], Any]] = {name: scaling_plot(fn) for name, fn in plots.SCALING_PLOTS.items()}
    out['accuracy_vs_dependency_length'] = lambda: plots_metrics.plot_metric_vs_x(
        runs, options['metric'], options['x'], options['group'], colors, error=options['error_bars'], chosen=chosen)
    out['length_generalization'] = lambda: plots_metrics.plot_length_generalization(
        runs, options['metric'], options['group'], colors, error=options['error_bars'], chosen=chosen)
    curves = sorted({k for r in runs if r.status == 'done' for k in (r.record.get('curves') or {})
                     if k.endswith('/loss_by_position')})
    curve = 'test/loss_by_position' if 'test/loss_by_position' in curves or not curves else curves[0]
    out['loss_by_position'] = lambda: plots_metrics.plot_loss_by_position(runs, colors, curve=curve)
    out['learning_curves'] = lambda: plots_metrics.plot_learning_curves(runs, options['metric'], options['group'],
                                                                        colors)
    return out


def _clean(value: Any) -> Any:
    """JSON without NaN: non-finite floats become null; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_events(out_dir: str, images: Mapping[str, tuple[bytes, int, int]], markdown: str) -> str:
    """The plots (tags report/NAME) and report.md as text, in a new event file in out_dir;
    each regeneration writes the next step, so TensorBoard's slider shows the latest."""
    from flaxformer_lite import tracking  # tensorboard's writer: imported only when writing
    step = len(glob.glob(os.path.join(out_dir, 'events.out.tfevents.*')))
    writer = tracking.Writer(out_dir)
    for name, (data, width, height) in images.items():
        writer.image(step, f'report/{name}', data, width, height)
    writer.text(step, 'report/summary', markdown)
    writer.close()
    return out_dir


def _read_section(paths: Sequence[str], runs: Sequence[Run], options: Mapping[str, Any], chosen: set) -> list[str]:
    counts = count_by_status(runs)
    sweeps = sorted({r.sweep for r in runs if r.sweep})
    singles = sum(r.sweep is None for r in runs)
    versions = sorted({str(v) for r in runs if (v := r.record.get('code_version'))})
    lines = ['## What was read', '']
    lines += [f'- `{p}`' for p in paths]
    what = [f'{len(sweeps)} sweep{"s" * (len(sweeps) != 1)} ({", ".join(sweeps)})'] if sweeps else []
    what += [f'{singles} single run{"s" * (singles != 1)}'] if singles else []
    lines.append(f'- {len(runs)} trial{"s" * (len(runs) != 1)} from {" and ".join(what)}: '
                 + ', '.join(f'{n} {s}' for s, n in counts.items()))
    lines.append(f'- loss: `{options["loss_metric"]}` (final value); task metric: `{options["metric"]}`')
    if (selection := tables.selection_line(chosen)) is not None:
        lines.append(selection)
    if versions:
        lines.append(f'- code version{"s" * (len(versions) > 1)}: {", ".join(versions)}')
    return lines + ['']


def _fits_section(fits: Sequence[scaling.Scaling] | None, skip: str, options: Mapping[str, Any]) -> list[str]:
    lines = ['## Scaling fits', '']
    if fits is None:
        return lines + [f'Not fitted: {skip}.', '']
    lines += [f'L = E + A x^-alpha fitted as in Hoffmann et al. (2022, Appendix D.2): Huber loss '
              f'(delta 1e-3) on log L, L-BFGS-B from a grid of starts; {options["level"]:g}% percentile '
              f'intervals from {options["bootstrap"]} bootstrap resamples (seed {options["seed"]}). '
              f'N: non-embedding parameters; C: training FLOPs (fitted on the Pareto frontier of the validation loss); '
              f'N*(C): minima of parabolas in log N at each compute budget, fitted in log-log.', '']
    for s in fits:
        lines += [f'- {line}' for line in scaling.describe(s)]
        lines += [f'- {s.label}: note: {note}' for note in s.notes]
    return lines + ['']


def _plots_section(written: Mapping[str, str], skipped: Mapping[str, str], options: Mapping[str, Any]) -> list[str]:
    lines = ['## Plots', '']
    for name, path in written.items():
        title = PLOT_TITLES.get(name, 'Tuning curves (the validation metric against the tuned value)')
        if name == 'accuracy_vs_dependency_length':
            title = f'{options["metric"]} against {options["x"]}'
        lines += [f'### {title}', '', f'![{title}]({os.path.basename(path)})', '']
    if skipped:
        lines += ['Skipped plots:', '']
        lines += [f'- `{name}`: {reason}' for name, reason in skipped.items()]
        lines.append('')
    return lines


def several_sweeps(runs: Sequence[Run]) -> bool:
    return len({r.sweep for r in runs if r.sweep}) > 1


def choose(runs: Sequence[Run], field: str, metric: str, group: Sequence[str], tie: str | None = None
           ) -> list[dict[str, Any]]:
    """For each group (e.g. family and size), the value of `field` (e.g. the learning
    rate) whose finished runs have the best mean `metric` (ties: the best mean `tie`):
    how an experiment file's tuned settings are chosen and reproduced. Both are read as
    their validation twins (`tables.validation_metric`: test/accuracy chooses by
    eval/accuracy); a row also gets the mean test metric of the runs chosen, where they
    report it."""
    metric = tables.validation_metric(metric)
    tie = tables.validation_metric(tie) if tie else None
    test = 'test/' + metric[len('eval/'):] if metric.startswith('eval/') else None

    def sign(name: str) -> float:
        return -1.0 if tables.lower_is_better(name) else 1.0

    buckets: dict[tuple, dict[Any, list[Run]]] = {}
    for run in runs:
        if run.status == 'done' and run.number(metric) is not None:
            key = tuple(hashable(run.value(g)) for g in group)
            buckets.setdefault(key, {}).setdefault(hashable(run.value(field)), []).append(run)
    rows = []
    for key, values_tried in buckets.items():
        def score(value):
            members = values_tried[value]
            mean = lambda m: sum(r.number(m) or 0.0 for r in members) / len(members)  # noqa: E731
            return (sign(metric) * mean(metric), sign(tie) * mean(tie) if tie else 0.0)
        best = max(values_tried, key=score)
        shown = tables.summarize(r.number(test) for r in values_tried[best]) if test else None
        rows.append({**dict(zip(group, key)), field: best, metric: abs(score(best)[0]),
                     **({tie: abs(score(best)[1])} if tie else {}), **({test: shown['mean']} if shown else {}),
                     'candidates': len(values_tried)})
    return rows


def _choose_section(runs: Sequence[Run], options: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    c = options.get('choose')
    if not c:
        return [], []
    group, tie = list(c.get('group', options['group'])), c.get('tie')
    metric = tables.validation_metric(c.get('metric', options['metric']))
    tie = tables.validation_metric(tie) if tie else None
    rows = choose(runs, c['field'], metric, group, tie)
    rule = f"the best mean {metric}" + (f" (ties: the best {tie})" if tie else '')
    test = 'test/' + metric[len('eval/'):] if metric.startswith('eval/') else None
    columns = group + [c['field'], metric] + ([tie] if tie else []) + ([test] if any(test in r for r in rows) else [])
    shown = f'; `{test}`: the mean of the runs chosen, shown only (it chooses nothing)' if test in columns else ''
    md = [f"## Chosen {c['field']}", '', f'For each {", ".join(group)}: {rule}{shown}.', '']
    md.append(tables.markdown_table(columns, [[tables.fmt(row.get(k)) for k in columns] for row in rows]))
    return md, rows


def _problems_section(runs: Sequence[Run]) -> list[str]:
    bad = [r for r in runs if r.status != 'done']
    lines = ['## Failed and pending trials', '']
    if not bad:
        return lines + ['None: every trial finished.', '']
    rows = [[r.name, r.status, tables.fmt(r.record.get('exit_code')), r.error, r.workdir] for r in bad]
    return lines + [tables.markdown_table(['trial', 'status', 'exit code', 'error', 'workdir'], rows)]


def build(paths: Sequence[str], out_dir: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything `write_report` promises (see the package docstring)."""
    if isinstance(paths, str):
        paths = [paths]
    runs = load_runs(paths)
    options = resolve_options(options, runs)
    os.makedirs(out_dir, exist_ok=True)
    out = {name: os.path.join(out_dir, name) for name in
           ('report.md', 'results.csv', 'results.json', 'results.md', 'aggregated.csv')}

    columns, rows = tables.trial_rows(runs)
    tables.write_csv(out['results.csv'], columns, rows)
    by = tables.group_fields(runs, options['table_group'])
    groups = tables.aggregate(runs, by)
    agg_columns, agg_rows = tables.groups_csv_rows(groups, by)
    tables.write_csv(out['aggregated.csv'], agg_columns, agg_rows)
    with open(out['results.md'], 'w', encoding='utf-8') as f:
        f.write('# All trials\n\n' + tables.trials_markdown(runs))

    fits, fits_skip = None, ''
    selected: set = set()  # (what was chosen on validation, the metric reported)
    if not options['fits']:
        fits_skip = "the report's options turn fits off (fits=False)"
    else:
        fits = scaling.analyse(runs, options['loss_metric'], tuned=options['tuned'], n_boot=int(options['bootstrap']),
                               seed=int(options['seed']), level=float(options['level']), chosen=selected)
        if not fits:
            fits, fits_skip = None, (f'no model family has finished runs reporting {options["loss_metric"]} '
                                     f'at two or more sizes')

    colors = plots.family_colors(r.family for r in runs)
    builders = _plot_builders(options, runs, fits, colors, fits_skip, selected)
    images, written, skipped = {}, {}, {}
    for name in list(PLOT_TITLES) if options['plots'] is None else options['plots']:
        try:
            fig = builders[name]()
        except plots.Skip as e:
            skipped[name] = str(e)
            continue
        images[name] = plots.png(fig)
        written[name] = os.path.join(out_dir, f'{name}.png')
        with open(written[name], 'wb') as f:
            f.write(images[name][0])

    tuned = tuning_curves.read(paths)  # the tuning stage of tuned sweeps: its curves and choices
    if tuned:
        images['tuning_curves'] = plots.png(tuning_curves.plot(tuned))
        written['tuning_curves'] = os.path.join(out_dir, 'tuning_curves.png')
        with open(written['tuning_curves'], 'wb') as f:
            f.write(images['tuning_curves'][0])

    title = options['title'] or 'Report: ' + ', '.join(
        sorted({r.sweep for r in runs if r.sweep}) or [os.path.basename(os.path.normpath(p)) for p in paths])
    metrics = tables.headline_metrics(runs)
    chosen = [m for m in (options['metric'], options['loss_metric']) if m and m not in metrics
              and any(r.number(m) is not None for r in runs)]
    metrics = chosen + metrics  # the metrics the report is about (eval/* when tuning), then the test ones
    if options['table_metrics']:  # the options name the summary table's columns (per-length ones, say)
        metrics = list(options['table_metrics'])
    md = [f'# {title}', ''] + _read_section(paths, runs, options, selected)
    level = float(options['level'])
    interval = options['metric'] if options['metric'] in metrics else None
    md += ['## Results', '', f'Mean ± std over seeds; `runs` is the number of finished runs in each row. '
           + (f'`{tables.interval_column(interval, level)}`: where the mean of a rerun with as many other '
              f'seeds should fall (Student-t prediction interval, mean ± t(n-1) · std · sqrt(2/n); none for '
              f'one run). ' if interval else '')
           + f'Every trial: [results.md](results.md), [results.csv](results.csv); aggregates: '
           f'[aggregated.csv](aggregated.csv), [results.json](results.json).', '']
    md += [tables.groups_markdown(groups, by, metrics, interval, level) if groups else 'No finished runs yet.\n']
    md += [tables.convergence_legend(runs), ''] if groups else []
    reproduction: list[dict] = []
    # A tuned value is an outcome of each sweep's protocol, not a setting: a rerun that tuned
    # to another rate is still the same setting, held to the same interval.
    setting = [f for f in by if f not in {record['field'] for _, record in tuned}]
    for i, metric in enumerate((options['reproduce'] or [options['metric']]) if several_sweeps(runs) else []):
        rows_of = reproduce.compare(runs, setting, metric, level)
        md += reproduce.section(rows_of, setting, metric, level, first=i == 0)
        reproduction += rows_of
    chosen_md, chosen = _choose_section(runs, options)
    md += tuning_curves.section(tuned) if tuned else []
    md += chosen_md + _fits_section(fits, fits_skip, options) + _plots_section(written, skipped, options)
    md += _problems_section(runs)
    markdown = '\n'.join(md).rstrip('\n') + '\n'
    with open(out['report.md'], 'w', encoding='utf-8') as f:
        f.write(markdown)

    summary = dict(
        runs=count_by_status(runs), loss_metric=options['loss_metric'], metric=options['metric'],
        fits=[s.to_dict() for s in fits or []], fits_skipped=fits_skip or None, plots=dict(written),
        skipped=skipped, chosen=chosen or None, reproduction=reproduction or None,
        failed=[r.name for r in runs if r.status == 'failed'],
        pending=[r.name for r in runs if r.status in ('pending', 'running')])
    with open(out['results.json'], 'w', encoding='utf-8') as f:
        json.dump(_clean(dict(report='flaxformer_lite.analysis', options=options, trials=rows,
                              aggregated=[g.to_dict() for g in groups], summary=summary)), f, indent=1, default=str)
    paths_out = {k.replace('.', '_'): v for k, v in out.items()}
    paths_out.update(plots=dict(written), events=_write_events(out_dir, images, markdown))
    return dict(paths=paths_out, summary=_clean(summary))
