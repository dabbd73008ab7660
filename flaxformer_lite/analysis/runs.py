"""Finished (and unfinished) runs read back from their workdirs: `results.json`, `sweep.json`.

A path may be a run workdir (holds `results.json`), a sweep workdir (holds `sweep.json`
and one trial workdir per trial) or a folder holding either, at any depth. A trial that
`sweep.json` lists but that has no `results.json` yet is "pending", unless the sweep
runner recorded it as failed or running in `logs/<dir>.json`; a run workdir with a
`config.json` and no results is pending too. Only files are read: nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from flaxformer_lite.errors import UserError
from flaxformer_lite.util import flatten

STATUSES = ('done', 'failed', 'running', 'pending')
# results.json's `convergence.status`: whether the validation loss was still improving over
# the last quarter of training (records written before it was recorded: unknown).
CONVERGENCE = ('converged', 'still_improving', 'unknown')
SEED_FIELDS = ('train.seed', 'task.seed')
# Top-level numbers of results.json that tables and fits read like metrics.
RECORD_NUMBERS = ('params_total', 'params_embedding', 'params_non_embedding', 'flops_per_token',
                  'flops_per_example', 'tokens_per_example', 'tokens', 'train_flops', 'wall_s',
                  'steps_per_s', 'step')
# Config fields that change how a run is watched, saved or laid out, not what it learns
# (as config.RESUMABLE_FIELDS, less train.steps): never a reason to tell runs apart.
BOOKKEEPING_FIELDS = ('train.log_every', 'eval.', 'checkpoint.', 'mesh.', 'data.')
# Directories never searched for runs (a run's own checkpoints can hold thousands of files).
SKIP_DIRS = ('checkpoints', 'checkpoint', '__pycache__', 'jax_cache', 'logs')
# Where the sweep runner keeps each trial's status (failed / running) and output.
LOG_DIR = 'logs'



@dataclasses.dataclass
class Run:
    """One trial or single run. `record` is its results.json as read ({} while pending)."""
    name: str
    status: str  # done | failed | running | pending
    workdir: str
    sweep: str | None = None  # the sweep's name (its workdir's basename, made unique); None: a single run
    sweep_dir: str | None = None
    trial_index: int | None = None
    swept_fields: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> str:
        return str(self.config.get('model.name') or self.record.get('family') or '?')

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get('metrics') or {}

    @property
    def convergence(self) -> str:
        """converged | still_improving | unknown (no record of it, or too few evaluations)."""
        record = self.record.get('convergence')
        status = record.get('status') if isinstance(record, Mapping) else None
        return status if status in CONVERGENCE else 'unknown'

    @property
    def error(self) -> str:
        return str(self.record.get('error') or '')

    def value(self, key: str) -> Any:
        """A metric ('test/loss'), a best value ('best/eval/accuracy'), a record number
        ('params_non_embedding') or a config field ('model.size'); None where absent."""
        if key in self.metrics:
            return self.metrics[key]
        if key.startswith('best/'):
            best = (self.record.get('best') or {}).get(key[len('best/'):])
            return best.get('value') if isinstance(best, Mapping) else best
        if key in RECORD_NUMBERS:
            return self.record.get(key)
        return self.config.get(key)

    def number(self, key: str) -> float | None:
        """`value(key)` as a finite float, else None."""
        v = self.value(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)


def _read_json(path: str) -> Any:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def _run_from_results(path: str, workdir: str, name: str) -> Run:
    """A run from its results.json; an unreadable file is a failed run that says why."""
    try:
        record = _read_json(path)
        if not isinstance(record, dict):
            raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:
        return Run(name=name, status='failed', workdir=workdir,
                   record={'error': f'results.json unreadable: {e}'})
    status = str(record.get('status', 'failed'))
    if status not in STATUSES:
        status = 'failed'
    config = record.get('config') or {}
    config = flatten(config) if any(isinstance(v, Mapping) for v in config.values()) else dict(config)
    return Run(name=str(record.get('name') or name), status=status, workdir=workdir, config=config, record=record)


def _pending_run(workdir: str, name: str, config: Mapping[str, Any]) -> Run:
    return Run(name=name, status='pending', workdir=workdir, config=dict(config),
               record={'error': 'no results.json yet'})


def _with_runner_status(run: Run, path: str) -> Run:
    """A trial not done, as the sweep runner recorded it in logs/<dir>.json: failed (with
    its exit code and last error line) or running; anything else stays pending."""
    try:
        status = _read_json(path)
    except (OSError, ValueError):
        return run
    if not isinstance(status, dict) or status.get('status') not in ('failed', 'running'):
        return run
    record = dict(run.record, status=status['status'], exit_code=status.get('exit_code'),
                  error=status.get('error') or run.record.get('error', ''), wall_s=status.get('wall_s'))
    return dataclasses.replace(run, status=status['status'], record=record)


def _is_report(path: str) -> bool:
    """The results.json that `write_report` writes is a table, not a run."""
    try:
        data = _read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and 'report' in data and 'status' not in data


def _load_sweep(sweep_dir: str) -> list[Run]:
    path = os.path.join(sweep_dir, 'sweep.json')
    try:
        sweep = _read_json(path)
        trials = sweep['trials']
        swept = tuple(sweep.get('swept_fields') or ())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'--report: {path} is not a readable sweep.json ({e}); '
                        f'rerun the sweep with --dry_run to rewrite it') from None
    runs = []
    for i, trial in enumerate(trials):
        trial_dir = os.path.join(sweep_dir, str(trial.get('dir', '')))
        name = str(trial.get('name') or os.path.basename(trial_dir))
        results = os.path.join(trial_dir, 'results.json')
        status_file = os.path.join(sweep_dir, LOG_DIR, f"{trial.get('dir', '')}.json")
        if os.path.isfile(results):
            run = _run_from_results(results, trial_dir, name)
        else:
            run = _pending_run(trial_dir, name, trial.get('overrides') or {})
        if run.status != 'done' and os.path.isfile(status_file):
            run = _with_runner_status(run, status_file)
        for key, value in (trial.get('overrides') or {}).items():
            run.config.setdefault(key, value)
        run.sweep_dir, run.swept_fields = sweep_dir, swept
        run.trial_index = int(trial.get('index', i))
        runs.append(run)
    return runs


def _load_single(workdir: str) -> Run:
    name = os.path.basename(os.path.normpath(workdir))
    results = os.path.join(workdir, 'results.json')
    if os.path.isfile(results):
        return _run_from_results(results, workdir, name)
    try:
        config = flatten(_read_json(os.path.join(workdir, 'config.json')))
    except (OSError, ValueError, AttributeError):
        config = {}
    return _pending_run(workdir, name, config)


def _find(path: str) -> Iterable[tuple[str, str]]:
    """(kind, dir) for every sweep ('sweep') and single run ('run') under `path`."""
    for root, dirs, files in os.walk(path):
        if 'sweep.json' in files:
            yield 'sweep', root
            dirs[:] = []
        elif 'results.json' in files and not _is_report(os.path.join(root, 'results.json')):
            yield 'run', root
            dirs[:] = []
        elif 'config.json' in files:
            yield 'run', root  # started, not finished
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d not in SKIP_DIRS)


def _unique_names(dirs: Sequence[str]) -> dict[str, str]:
    """Each sweep dir -> its basename, with parent folders added until the names differ."""
    names = {d: os.path.basename(os.path.normpath(d)) for d in dirs}
    depth = 1
    while len(set(names.values())) < len(names) and depth < 8:
        depth += 1
        names = {d: '/'.join(os.path.normpath(d).split(os.sep)[-depth:]) for d in dirs}
    return names


def load_runs(paths: Sequence[str]) -> list[Run]:
    """Every run under `paths`, in sweep order; raises UserError for a path without runs."""
    if isinstance(paths, str):
        paths = [paths]
    runs: list[Run] = []
    seen: set[str] = set()
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f'--report: {path} is not a directory; give a sweep or run workdir')
        found = list(_find(path))
        if not found:
            raise UserError(f'--report: {path} holds no runs (no results.json or sweep.json); '
                            f'give a sweep or run workdir')
        for kind, directory in found:
            new = _load_sweep(directory) if kind == 'sweep' else [_load_single(directory)]
            for run in new:
                key = os.path.realpath(run.workdir)
                if key not in seen:
                    seen.add(key)
                    runs.append(run)
    names = _unique_names(sorted({r.sweep_dir for r in runs if r.sweep_dir}))
    for run in runs:
        if run.sweep_dir:
            run.sweep = names[run.sweep_dir]
    return runs


def count_by_status(runs: Sequence[Run]) -> dict[str, int]:
    return {s: n for s in STATUSES if (n := sum(r.status == s for r in runs))}


def varying_fields(runs: Sequence[Run]) -> list[str]:
    """The fields that tell runs apart: every swept field, then (where some runs are not
    from a sweep) any config field but bookkeeping whose value differs between started runs."""
    fields: list[str] = []
    for run in runs:
        for f in run.swept_fields:
            if f not in fields:
                fields.append(f)
    if any(r.sweep_dir is None for r in runs):
        started = [r for r in runs if r.status != 'pending']  # a pending trial knows only its overrides
        keys: list[str] = []
        for run in started:
            keys.extend(k for k in run.config if k not in keys)
        for key in (k for k in keys if not k.startswith(BOOKKEEPING_FIELDS)):
            values = {json.dumps(r.config.get(key), sort_keys=True, default=str) for r in started}
            if len(values) > 1 and key not in fields:
                fields.append(key)
    return fields


def hashable(value: Any) -> Any:
    """A config value usable as a dict key (lists become tuples)."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return value
