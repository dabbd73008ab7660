"""Multi-host failures, with processes on 127.0.0.1: a process that never joins, or dies
mid-run, ends the others within --distributed_timeout with one line and exit status 5
(supervisor.supervise), not a hang and not jax's SIGABRT; the same command then resumes."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_scalars

pytestmark = pytest.mark.slow  # two jax.distributed processes, one killed

TIMEOUT = 8  # --distributed_timeout, seconds
ARGS = ['--config=configs/recall.py:quick', '--config.train.batch_size=16', '--config.model.size=tiny',
        '--config.model.d_model=32', '--config.model.d_ff=64', '--config.eval.num_examples=32',
        '--config.train.log_every=1', '--quiet', f'--distributed_timeout={TIMEOUT}']


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start(workdir, port, i, *more):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
    return subprocess.Popen([sys.executable, 'launch.py', *ARGS, *more, f'--workdir={workdir}',
                             f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_a_process_that_never_joins_ends_the_other_with_one_line(tmp_path):
    started = time.time()
    alone = _start(tmp_path / 'w', _free_port(), 0, '--config.train.steps=4')
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 5, err[-3000:]
    assert time.time() - started < TIMEOUT + 60
    lines = _error_lines(err)
    assert len(lines) == 1 and 'not every process joined within --distributed_timeout=8 s' in lines[0], err[-3000:]
    assert 'Traceback' not in err and 'SIGABRT' not in err and 'Check failure' not in err
    assert not (tmp_path / 'w').exists()  # nothing was written


def test_a_process_that_dies_mid_run_ends_the_other_and_the_rerun_resumes(tmp_path):
    workdir = tmp_path / 'w'
    more = ['--config.train.steps=160', '--config.checkpoint.every_steps=20', '--config.eval.every_steps=160']
    port = _free_port()
    procs = [_start(workdir, port, i, *more) for i in range(2)]
    deadline = time.time() + 300
    while not (workdir / 'checkpoints' / '20').is_dir():  # killed mid-run, after a checkpoint
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[1].kill()
    killed = time.time()
    _, err = procs[0].communicate(timeout=TIMEOUT + 90)
    assert procs[0].returncode == 5, err[-3000:]
    assert time.time() - killed < TIMEOUT + 60
    lines = _error_lines(err)
    assert len(lines) == 1 and 'process 1 stopped responding' in lines[0], err[-3000:]
    assert 'run the same command on every process again' in lines[0]
    assert 'Traceback' not in err and 'Check failure' not in err
    procs[1].communicate()

    # The same command on both processes: the dead run's lock is stale and taken over, the
    # run resumes from its last complete checkpoint and finishes.
    port = _free_port()
    procs = [_start(workdir, port, i, *more) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    losses = read_scalars(str(workdir))['train/loss']
    assert sorted(losses) == list(range(1, 161))  # every step once in the TensorBoard history
