"""The test SLURM cluster itself: a job array runs every task on the local node."""

from __future__ import annotations

import subprocess

import pytest

from slurm_cluster import slurm, wait_for_job  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('slurm')]  # starts a real SLURM, once


def test_job_array_runs_every_task(slurm, tmp_path):  # noqa: F811
    out = tmp_path / 'out'
    out.mkdir()
    script = tmp_path / 'task.sh'
    script.write_text('#!/bin/sh\n'
                      f'echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID" > {out}/$SLURM_ARRAY_TASK_ID.txt\n')
    submit = subprocess.run(
        ['sbatch', '--parsable', '--array=0-2', '--ntasks=1', '--cpus-per-task=1',
         f'--output={tmp_path}/%A_%a.log', str(script)],
        env=slurm['env'], capture_output=True, text=True, timeout=30)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(';')[0]
    wait_for_job(slurm, job_id, timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ['0.txt', '1.txt', '2.txt']
    for i in range(3):
        assert (out / f'{i}.txt').read_text() == f'task {i} of {job_id}\n'
