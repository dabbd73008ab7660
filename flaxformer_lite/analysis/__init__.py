"""Finished runs -> tables, scaling-law fits and plots, in one report folder.

Reads files only (`results.json`, `sweep.json`); never imports jax, models or train, so a
report runs anywhere the run folders are. `launch.py --report` calls `write_report`.

    from flaxformer_lite import analysis
    out = analysis.write_report(['runs/tvl'], 'runs/tvl/report')
    out['summary']['fits']   # every fit as numbers, or with the reason it was not fitted

The folder then holds `report.md` (what was read, the seed-aggregated table with how many
runs of each row had converged, each fit with its interval and number of points, the
plots, failed and pending trials), `results.csv`, `results.md` (one row per trial),
`aggregated.csv` (mean, std, min, max, n per metric over seeds), `results.json` (all of
it), one PNG per plot, and a TensorBoard event file with
the plots under `report/<plot>` and report.md as text. The table states the spread a
rerun is held to (the task metric's prediction interval for the mean of as many other
seeds); a report over several sweeps of the same settings (seeds 0-2, then 3-5) adds a
section checking each against the other (`reproduce.py`).

`options` (optional; an experiment file passes its own from `get_report`) choose what the report shows:
    title        report heading (default: the sweep names)
    loss_metric  loss for the fits (default 'test/loss', else 'eval/loss'); 'best/eval/loss'
                 reads the best value instead of the final one
    metric       task metric of the accuracy plots (default the first reported of
                 test/accuracy, eval/accuracy, test/exact_match, test/mse, ...)
    x            config field on the accuracy plot's x axis (default 'task.dependency_length')
    group        fields that make one line of the accuracy plots (default model.name, model.size)
    table_group  fields the aggregated table groups by (default every swept field but seeds)
    tuned        fields tuned per point, keeping their best value (default: swept optim.*),
                 chosen on the validation twin of the metric (eval/loss for test/loss)
    plots        names to draw (default: every plot whose data exists): loss_vs_params,
                 loss_vs_compute, isoflop, optimal_params ('scaling' means these four),
                 accuracy_vs_dependency_length, length_generalization, loss_by_position
    error_bars   'std' (default) or 'minmax'
    bootstrap, seed, level   resamples (200), their seed (0) and interval level in % (95)
    fits         False skips the scaling fits
A plot whose data is missing is skipped, and report.md says why.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from flaxformer_lite.analysis.fits import Fit, IsoFlopFit, Parabola, fit_isoflop, fit_parabola, fit_power_law, \
    pareto_frontier
from flaxformer_lite.analysis import report
from flaxformer_lite.analysis.report import resolve_options
from flaxformer_lite.analysis.runs import Run, load_runs
from flaxformer_lite.analysis.scaling import Scaling, analyse
from flaxformer_lite.analysis.tables import Group, aggregate, summarize, trial_rows

__all__ = ['write_report', 'load_runs', 'Run', 'aggregate', 'Group', 'summarize', 'trial_rows', 'analyse',
           'Scaling', 'fit_power_law', 'fit_isoflop', 'fit_parabola', 'pareto_frontier', 'Fit', 'IsoFlopFit',
           'Parabola', 'resolve_options']


def write_report(paths: Sequence[str], out_dir: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read the runs under `paths`, write the report into `out_dir`.

    Returns {'paths': {'report_md', 'results_csv', 'results_json', 'results_md',
    'aggregated_csv', 'plots': {name: png}, 'events': dir}, 'summary': {'runs': counts by
    status, 'fits': [...], 'plots', 'skipped': {name: reason}, 'failed', 'pending', ...}}.
    Raises `flaxformer_lite.errors.UserError` for a path without runs or a bad option."""
    return report.build(paths, out_dir, options)
