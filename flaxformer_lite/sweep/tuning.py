"""Tuning as a stage of a sweep: each group of trials gets its own value of the tuned
fields, chosen on the validation split, before the main trials run.

    def get_sweep(arg):
        main = sweep.product({'model.name': ['transformer', 'lstm'], 'model.size': ['micro', 'tiny']},
                             sweep.seeds(3))
        return sweep.tuned(main, {'optim.learning_rate': [3e-4, 1e-3, 3e-3, 1e-2]},
                           by=('model.name', 'model.size'), metric='eval/loss')

`--sweep` then runs, in the sweep's workdir:
1. the tuning trials in `tune/` (a sweep of its own): for every group (the distinct values
   of `by` among the main trials), the group's first main trial with every grid value, at
   the main trials' budget unless `budget` says otherwise, with `seeds` seeds;
2. the choice: per group, the grid value whose mean (over the tuning seeds) final
   validation metric is best. `metric` must be a validation metric (`eval/*`): the test
   split is never used to choose. A choice at the edge of the grid is extended by one grid
   step beyond it (geometric for a grid of positive values) and chosen again; if it is
   still at the edge, or `extend=False`, it is flagged in `tuning.json` and the report;
3. the main trials, each with its group's chosen values.
The choices, the curves and the flags are in `tuning.json`; `--report` plots the curves.
Rerunning the command skips what is done; killing it at any moment is safe (each stage is
an ordinary sweep). With `--slurm` the tuning trials are one job array and the main trials
a second array that starts after the first succeeded (`--dependency=afterok`); its tasks
make the choice themselves, so on SLURM an edge is flagged, not extended.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from flaxformer_lite.errors import UserError

TUNE_DIR = 'tune'
TUNING_FILE = 'tuning.json'
SEED_FIELD = 'train.seed'


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A sweep whose main trials take values chosen by a tuning stage (see `tuned`)."""
    main: list[dict[str, Any]]
    grid: dict[str, list[Any]]
    by: tuple[str, ...]
    metric: str = 'eval/loss'
    seeds: int = 1
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    extend: bool = True
    first_seed: int = 0


def tuned(main: Sequence[Mapping[str, Any]], grid: Mapping[str, Sequence[Any]], *, by: Sequence[str],
          metric: str = 'eval/loss', seeds: int = 1, budget: Mapping[str, Any] | None = None,
          extend: bool = True, first_seed: int = 0) -> Tuned:
    """`main` (a list of trials, as `product` gives) with the fields of `grid` tuned per
    group of `by`, on validation `metric`, with `seeds` tuning seeds, at the main trials'
    budget or at `budget` (fields such as {'train.steps': 2000}); `extend=False` flags a
    choice at the grid's edge instead of extending the grid. The tuning seeds are
    `first_seed`, `first_seed` + 1, ... (a rerun with other seeds retunes with other seeds
    too). One field is tuned per stage."""
    return Tuned(main=[dict(t) for t in main], grid={k: list(v) for k, v in grid.items()}, by=tuple(by),
                 metric=metric, seeds=int(seeds), budget=dict(budget or {}), extend=bool(extend),
                 first_seed=int(first_seed))


def check(spec: Tuned, known_field) -> None:
    """UserError, one line, for a tuning definition that cannot work. `known_field(name)`
    tells whether a config field exists."""
    where = 'sweep.tuned'
    if len(spec.grid) != 1:
        raise UserError(f'{where}: the grid names {len(spec.grid)} fields; tune one field per stage (a dict with one '
                        f'field and two or more values)')
    for field, values in spec.grid.items():
        if not known_field(field):
            raise UserError(f'{where}: the tuned field {field} does not exist in the config; check its name '
                            f'(python launch.py --config=... --describe lists the fields)')
        if len(values) < 2 or len({json.dumps(v) for v in values}) < len(values):
            raise UserError(f'{where}: the grid of {field} has {len(values)} distinct point(s); tuning needs two or '
                            f'more distinct values')
        if any(field in t for t in spec.main):
            raise UserError(f'{where}: the main trials set {field}, which is tuned; leave it to the tuning stage')
    for field in spec.by:
        if not known_field(field):
            raise UserError(f'{where}: by={field} is not a config field; group by fields the main trials set')
    if not spec.metric.startswith('eval/'):
        raise UserError(f"{where}: metric={spec.metric!r} is not a validation metric; choose on eval/* "
                        f"(for example 'eval/loss'), never on test/*")
    if spec.seeds < 1:
        raise UserError(f'{where}: seeds={spec.seeds}; give 1 or more tuning seeds')
    if spec.first_seed < 0:
        raise UserError(f'{where}: first_seed={spec.first_seed}; give a whole number, 0 or more')


def group_key(trial: Mapping[str, Any], by: Sequence[str]) -> str:
    return json.dumps({f: trial.get(f) for f in by}, sort_keys=True, default=list)


def groups(spec: Tuned) -> dict[str, dict[str, Any]]:
    """{group key: the group's first main trial, without its seed}, in order of first appearance."""
    out: dict[str, dict[str, Any]] = {}
    for trial in spec.main:
        out.setdefault(group_key(trial, spec.by), {k: v for k, v in trial.items() if k != SEED_FIELD})
    return out


def _points(spec: Tuned, extra: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The grid's points, then `extra` (a group's extensions)."""
    (field, values), = spec.grid.items()
    return [{field: v} for v in [*values, *extra]]


def tune_trials(spec: Tuned, extensions: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The tuning stage's trials: group x grid point (+ the group's extensions) x seed."""
    trials = []
    for key, base in groups(spec).items():
        for point in _points(spec, extensions.get(key, ())):
            for seed in range(spec.first_seed, spec.first_seed + spec.seeds):
                trials.append({**base, **spec.budget, **point, SEED_FIELD: seed})
    return trials


def _step_beyond(values: Sequence[Any], edge: Any, upward: bool) -> Any | None:
    """One grid step past `edge`: geometric when the grid is positive, else arithmetic."""
    ordered = sorted(values)
    if len(ordered) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ordered):
        return None
    near = ordered[-2] if upward else ordered[1]
    if all(v > 0 for v in ordered):
        out = edge * (edge / near)
    else:
        out = edge + (edge - near)
    return type(edge)(out) if isinstance(edge, int) and float(out).is_integer() else float(f'{out:.6g}')


def select(spec: Tuned, results: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
           extensions: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The choice per group from the tuning trials' (overrides, results.json) pairs:
    {'metric', 'fields', 'groups': [{group, curve: [[value, mean, n]], chosen, at_edge,
    extended}], 'extensions': {group key: values to add}}. Only the validation metric is read."""
    from flaxformer_lite.analysis.tables import lower_is_better  # the report's own rule, so both agree
    field = next(iter(spec.grid))
    lower = lower_is_better(spec.metric)
    by_group: dict[str, dict[str, list[float]]] = {}
    for overrides, record in results:
        if record is None or record.get('status') not in ('done', 'evaluated'):
            raise UserError(f'the tuning stage is not finished ({json.dumps(overrides, default=list)} has no '
                            f'results); rerun the sweep command to finish it')
        value = (record.get('metrics') or {}).get(spec.metric)
        if value is None:
            raise UserError(f'sweep.tuned: tuning trial {json.dumps(overrides, default=list)} did not log '
                            f'{spec.metric}; choose a validation metric every trial logs')
        key = group_key(overrides, spec.by)
        by_group.setdefault(key, {}).setdefault(json.dumps(overrides[field]), []).append(float(value))
    out_groups, new_ext = [], {}
    for key, base in groups(spec).items():
        curve = sorted(([json.loads(v), sum(xs) / len(xs), len(xs)] for v, xs in by_group.get(key, {}).items()),
                       key=lambda row: row[0])
        if not curve:
            raise UserError(f'the tuning stage has no results for group {key}; rerun the sweep command')
        best = (min if lower else max)(curve, key=lambda row: row[1])
        values = [row[0] for row in curve]
        at_edge = best[0] in (values[0], values[-1])
        extended = list(extensions.get(key, ()))
        if at_edge and spec.extend and not extended:
            step = _step_beyond(values, best[0], upward=best[0] == values[-1])
            if step is not None and step not in values:
                new_ext[key] = [step]
        out_groups.append({'group': json.loads(key), 'curve': curve, 'chosen': best[0], 'at_edge': at_edge,
                           'extended': extended})
    return {'metric': spec.metric, 'field': field, 'lower_is_better': lower, 'seeds': spec.seeds,
            'groups': out_groups, 'extensions': {**{k: list(v) for k, v in extensions.items()}, **new_ext},
            'pending_extensions': new_ext}


def read(root: str) -> dict[str, Any] | None:
    path = os.path.join(root, TUNING_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir={root}: {TUNING_FILE} is damaged ({e}); delete it to choose again from the '
                        f'tuning trials') from None


def write(root: str, record: Mapping[str, Any]) -> None:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, TUNING_FILE)
    with open(path + f'.tmp{os.getpid()}', 'w') as f:
        json.dump(record, f, indent=2, default=list)
        f.write('\n')
    os.replace(path + f'.tmp{os.getpid()}', path)


def extensions_of(root: str) -> dict[str, list[Any]]:
    record = read(root)
    return dict(record.get('extensions', {})) if record else {}


def main_trials(spec: Tuned, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The main trials with their group's chosen value."""
    chosen = {group_key(g['group'], spec.by): g['chosen'] for g in record['groups']}
    field = record['field']
    missing = next((t for t in spec.main if group_key(t, spec.by) not in chosen), None)
    if missing is not None or field not in spec.grid:
        raise UserError(f'{TUNING_FILE} was chosen for another tuning definition (no choice of {field} for group '
                        f'{group_key(missing or {}, spec.by)}); the sweep file changed since: move {TUNING_FILE} and '
                        f'{TUNE_DIR}/ aside to tune again, or restore the sweep file')
    return [{**t, field: chosen[group_key(t, spec.by)]} for t in spec.main]
