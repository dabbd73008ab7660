"""A sweep as one SLURM job array: `launch.py ... --sweep --slurm` writes
`<sweep>/sweep.sbatch` over the unfinished trials and submits it with `sbatch`
(`--slurm=write` only writes). Each array task runs `--trial=$SLURM_ARRAY_TASK_ID`, the
same entry point as the local runner, so reruns, failure records and the compilation
cache behave the same on a cluster.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from flaxformer_lite.errors import UserError
from flaxformer_lite.sweep.plan import LOG_DIR, SLURM_SCRIPT, Sweep
from flaxformer_lite.sweep.runner import child_env, read_status, trial_command

SCRIPT = SLURM_SCRIPT


def array_spec(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start, prev = [], None, None
    for i in sorted(indices) + [None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(str(start) if start == prev else f'{start}-{prev}')
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ','.join(out)


def sbatch_options(slurm_args: str) -> list[str]:
    """`--slurm_args` split into sbatch options (UserError for anything else)."""
    try:
        extra = shlex.split(slurm_args or '')
    except ValueError as e:
        raise UserError(f'--slurm_args={slurm_args!r}: {e}; quote it as one shell word') from None
    for arg in extra:
        if not arg.startswith('-'):
            raise UserError(f"--slurm_args: '{arg}' is not an sbatch option; write them as --name=value")
    return extra


def write_script(sweep: Sweep, slurm_args: str = '') -> tuple[str, list[int]]:
    """(path of sweep.sbatch, the trial indices it runs). `slurm_args` are sbatch options
    ("--partition=gpu --gres=gpu:1 --time=2:00:00"), one #SBATCH line each."""
    todo = [t.index for t in sweep.trials if read_status(sweep, t).get('status') != 'done']
    extra = sbatch_options(slurm_args)
    if not todo:
        return '', []
    logs = os.path.abspath(os.path.join(sweep.workdir, LOG_DIR))
    command = ' '.join('--trial="$SLURM_ARRAY_TASK_ID"' if a == '--trial=TASK' else shlex.quote(a)
                       for a in trial_command(sweep, 'TASK'))
    lines = ['#!/bin/bash', f'#SBATCH --job-name={sweep.name}', f'#SBATCH --array={array_spec(todo)}',
             f'#SBATCH --output={logs}/slurm-%A_%a.log', '#SBATCH --ntasks=1',
             *(f'#SBATCH {arg}' for arg in extra), '',
             '# One trial per array task; a rerun of this sweep skips finished trials.',
             f'cd {shlex.quote(os.getcwd())}',
             f"export PYTHONPATH={shlex.quote(child_env()['PYTHONPATH'])}",
             f'exec {command}', '']
    os.makedirs(logs, exist_ok=True)
    path = os.path.join(sweep.workdir, SCRIPT)
    with open(path + '.tmp', 'w') as f:
        f.write('\n'.join(lines))
    os.replace(path + '.tmp', path)
    return path, todo


def submit(path: str, env: dict[str, str] | None = None, dependency: str | None = None) -> str:
    """sbatch the script (after job `dependency` succeeded, if given); returns the job id."""
    sbatch = shutil.which('sbatch', path=(env or os.environ).get('PATH'))
    if sbatch is None:
        raise UserError(f'--slurm: sbatch is not on this machine; {path} is written: submit it where SLURM runs, '
                        f'or use --slurm=write')
    after = [f'--dependency=afterok:{dependency}'] if dependency else []
    proc = subprocess.run([sbatch, '--parsable', *after, path], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode:
        raise UserError(f'--slurm: sbatch refused {path}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}')
    return proc.stdout.strip().split(';')[0]
