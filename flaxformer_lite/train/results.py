"""`results.json`: the machine-readable record of a finished run, which sweeps and the
report read (`flaxformer_lite/analysis` never needs anything else of a run).

Written atomically (temporary file + rename) at the end of training and again by
`launch.py --eval_only`, so a reader never sees half a file.

It also says whether the run had converged (`convergence`, the rule below): read from
the run's own TensorBoard event files, which show one clean curve across resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
from typing import Any, Iterable, Mapping

import numpy as np

from flaxformer_lite import accounting
from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import UserError
from flaxformer_lite.resolve import Run
from flaxformer_lite.train.evaluate import LOWER_IS_BETTER

RESULTS_FILE = 'results.json'
STATUSES = ('done', 'evaluated')

# Convergence: judged on the validation loss, which every task logs.
CONVERGENCE_METRIC = 'eval/loss'
CONVERGENCE_MIN_POINTS = 3
# Changes no larger than these are no improvement: 1% of the level, and 0.001 (a solved
# task's loss creeps towards 0 for as long as it trains).
CONVERGENCE_TOLERANCE = 0.01
CONVERGENCE_FLOOR = 1e-3
CONVERGENCE_RULE = ('least-squares line of eval/loss against step over the evaluations in the last quarter of '
                    'training (3 or more, else unknown); still_improving when the improvement it predicts over those '
                    'steps exceeds 2 standard errors of that prediction, 1% of the mean level there and 0.001, '
                    'else converged')


@functools.cache
def code_version() -> str | None:
    """The git commit of this code ('+dirty' when tracked files differ from it), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(['git', 'rev-parse', '--short=12', 'HEAD'], cwd=here, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ('+dirty' if dirty else '')


def _plain(value: Any) -> Any:
    """JSON-safe: NumPy scalars become floats/ints; NaN and Inf become None."""
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def convergence(series: Iterable[tuple[int, float]], final_step: int, *, metric: str = CONVERGENCE_METRIC,
                lower_is_better: bool | None = None) -> dict[str, Any]:
    """Whether `metric` was still improving at the end of training: `CONVERGENCE_RULE`.

    `series` is (step, value) as logged (a step logged twice counts once, its last value;
    non-finite values are left out); the window is the last quarter of `final_step` steps.
    Over the n >= 3 points there, a least-squares line y = a + b·step gives the change it
    predicts across the window's span, b·span, with standard error SE(b)·span, where
    SE(b) = sqrt(SSR / (n - 2) / Σ(step - mean)²). The run is still_improving when that
    change is an improvement (a fall, for a loss) larger than max(2·SE(b)·span, 1% of the
    mean value in the window, 0.001), else converged: flat, within its noise, too small to
    matter, or getting worse. Fewer than 3 points: unknown. The slope is per 1000 steps."""
    if lower_is_better is None:
        lower_is_better = metric.rsplit('/', 1)[-1] in LOWER_IS_BETTER
    by_step = {int(s): float(v) for s, v in series if v is not None and math.isfinite(float(v))}
    window = sorted((s, v) for s, v in by_step.items() if 4 * s >= 3 * final_step and s <= final_step)
    out: dict[str, Any] = {'status': 'unknown', 'metric': metric, 'slope_per_1k_steps': None, 'points': len(window)}
    if len(window) < CONVERGENCE_MIN_POINTS:
        return dict(out, rule=CONVERGENCE_RULE)
    steps = np.array([s for s, _ in window], dtype=np.float64)
    values = np.array([v for _, v in window], dtype=np.float64)
    centred = steps - steps.mean()
    sxx = float(centred @ centred)
    slope = float(centred @ (values - values.mean())) / sxx
    residuals = values - values.mean() - slope * centred
    se = math.sqrt(float(residuals @ residuals) / (len(window) - 2) / sxx)
    span = float(steps[-1] - steps[0])
    improvement = (-slope if lower_is_better else slope) * span
    threshold = max(2.0 * se * span, CONVERGENCE_TOLERANCE * abs(float(values.mean())), CONVERGENCE_FLOOR)
    return dict(out, status='still_improving' if improvement > threshold else 'converged',
                slope_per_1k_steps=slope * 1000.0, window=[int(steps[0]), int(steps[-1])],
                change=slope * span, threshold=threshold, rule=CONVERGENCE_RULE)


def event_series(workdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of scalar `tag` as TensorBoard shows the run in `workdir`: every event
    file there, in order, with the events a resumed run logged again purged (the
    SessionLog restart the loop writes), so each step once. [] where there are none."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(workdir, size_guidance={'tensors': 0}, purge_orphaned_data=True)
    acc.Reload()
    if tag not in acc.Tags().get('tensors', ()):
        return []
    return [(int(e.step), float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def run_convergence(workdir: str, step: int) -> dict[str, Any]:
    """`convergence` of the run in `workdir` up to `step`, from its event files; unknown
    (with the reason) where they cannot be read: the record is written regardless."""
    try:
        series = event_series(workdir, CONVERGENCE_METRIC)
    except Exception as e:  # pylint: disable=broad-except  # a damaged event file must not lose the results
        return dict(convergence([], step), error=f'event files unreadable: {e}')
    return convergence(series, step)


def build(exp: Run, *, name: str, workdir: str, step: int, metrics: Mapping[str, float],
          best: Mapping[str, Mapping[str, float]], curves: Mapping[str, Any], wall_s: float, train_s: float,
          timed_steps: int, skipped_updates: int = 0) -> dict[str, Any]:
    counts = accounting.summary(exp)
    examples = step * exp.config.train.batch_size
    return _plain({
        'status': 'done',
        'name': name,
        'workdir': os.path.abspath(workdir),
        'family': exp.family.name,
        'task': exp.task.name,
        'kind': exp.spec.kind,
        'config': config_lib.flatten(json.loads(config_lib.to_json(exp.config))),
        'metrics': dict(sorted(metrics.items())),
        'best': dict(sorted(best.items())),
        'convergence': run_convergence(workdir, step),
        'chance': exp.task.chance(),
        'curves': {f'{prefix}/loss_by_position': list(curve) for prefix, curve in curves.items()},
        'step': step,
        'skipped_updates': int(skipped_updates),  # non-finite updates skipped (train.skip_nonfinite)
        'steps_per_s': timed_steps / train_s if train_s > 0 else None,
        'wall_s': wall_s,
        'train_s': train_s,
        **{k: counts[k] for k in ('params_total', 'params_embedding', 'params_non_embedding', 'flops_per_token',
                                  'flops_per_example', 'tokens_per_example')},
        'tokens': examples * counts['tokens_per_example'],
        'train_flops': examples * counts['flops_per_example'],
        'code_version': code_version(),
    })


def checksum(record: Mapping[str, Any]) -> str:
    """sha256 of the record without its `checksum` field (canonical JSON): a hand edit shows."""
    body = {k: v for k, v in record.items() if k != 'checksum'}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def write(workdir: str, results: Mapping[str, Any]) -> str:
    path = os.path.join(workdir, RESULTS_FILE)
    tmp = path + '.tmp'
    record = {k: v for k, v in results.items() if k != 'checksum'}
    record['checksum'] = checksum(record)
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=2, allow_nan=False)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read(workdir: str) -> dict[str, Any] | None:
    """The run's results, or None if it has none (not finished). A file that is not
    JSON, or lacks what this code reads (status, step, metrics), is a UserError: a run
    never silently redoes or ignores a record that was damaged or edited by hand."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    fix = 'restore it, or delete it to have the run evaluate its last checkpoint and write it again'
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir={workdir}: {RESULTS_FILE} is damaged ({e}); {fix}') from None
    problem = None
    if not isinstance(record, dict):
        problem = 'it is not a JSON object'
    elif record.get('status') not in STATUSES:
        problem = f"status={record.get('status')!r} is not one of {', '.join(STATUSES)}"
    elif not isinstance(record.get('step'), int) or isinstance(record.get('step'), bool) or record['step'] < 0:
        problem = f"step={record.get('step')!r} is not a step number"
    elif not isinstance(record.get('metrics'), dict):
        problem = 'metrics is not a mapping'
    elif 'checksum' in record and record['checksum'] != checksum(record):  # records written before it: none
        problem = 'its contents do not match its checksum'
    if problem:
        raise UserError(f'--workdir={workdir}: {RESULTS_FILE} was edited by hand or is damaged ({problem}); {fix}')
    return record
