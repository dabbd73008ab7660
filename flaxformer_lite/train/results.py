"""`results.json`: the machine-readable record of a finished run, which sweeps and the
report read (`flaxformer_lite/analysis` never needs anything else of a run).

Written atomically (temporary file + rename) at the end of training and again by
`launch.py --eval_only`, so a reader never sees half a file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
from typing import Any, Mapping

import numpy as np

from flaxformer_lite import accounting
from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import UserError
from flaxformer_lite.experiment import Experiment

RESULTS_FILE = 'results.json'
STATUSES = ('done', 'evaluated')


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


def build(exp: Experiment, *, name: str, workdir: str, step: int, metrics: Mapping[str, float],
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
