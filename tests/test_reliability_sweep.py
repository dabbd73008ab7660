"""A sweep runner killed with kill -9 at random moments (--parallel=2), then run again:
every trial finishes exactly once, with the results of the trial run alone; while a
runner is alive a second runner, and a second process for one of its trials (what two
SLURM array tasks given the same trial would be), are refused at once, naming it; the
report reads the sweep meanwhile."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import (ROOT, TINY_MODEL, TINY_RECALL, assert_same_tree, event_history, restore_state,  # noqa: F401
                      shared_jax_cache, zygote)  # noqa: F401  (fixtures)

from flaxformer_lite import cli
from flaxformer_lite import config as config_lib

pytestmark = pytest.mark.slow  # kills sweep runners and their trials

FIELDS = {**TINY_RECALL, **TINY_MODEL, 'train.steps': 20, 'optim.decay_steps': 20, 'train.batch_size': 16,
          'train.log_every': 5, 'eval.every_steps': 10, 'eval.num_examples': 32, 'checkpoint.every_steps': 5,
          'checkpoint.async_save': True, 'optim.warmup_steps': 2, 'optim.learning_rate': 3e-3}
# Trials differ in their data only (task.seed), so they share one compiled program.
EXPERIMENT = f'''
from flaxformer_lite import sweep
from flaxformer_lite.config import make_config

def get_config(arg=None):
    return make_config(None, task='recall', defaults={FIELDS!r})

def get_sweep(arg=None):
    return sweep.product({{'task.seed': [1, 2, 3]}})
'''


def _launch(*args, **kwargs):
    return subprocess.Popen([sys.executable, 'launch.py', *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _statuses(workdir):
    """{trial folder: its status record} from logs/."""
    logs = workdir / 'logs'
    out = {}
    for name in sorted(os.listdir(logs)) if logs.exists() else ():
        if name.endswith('.json'):
            try:
                out[name[:-len('.json')]] = json.loads((logs / name).read_text())
            except ValueError:  # being replaced right now
                pass
    return out


def _wait_for(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError('timed out')


def _trial_dirs(workdir):
    return sorted(d for d in os.listdir(workdir) if d[:4].isdigit() and (workdir / d).is_dir())


def test_a_sweep_runner_killed_at_random_moments_finishes_every_trial_once(tmp_path, zygote):
    config = tmp_path / 'exp.py'
    config.write_text(EXPERIMENT)
    workdir = tmp_path / 'sweep'
    command = [f'--config={config}', '--sweep', f'--workdir={workdir}', '--parallel=2']
    rng = random.Random(7)
    # First each trial alone (--trial=I in a sweep of its own, on one core as the runner
    # gives each trial): what the killed sweep's trials must equal. Their compiled
    # programs then seed the sweep's cache, so the runner's trials do not compile.
    alone = tmp_path / 'alone'
    for index in range(3):
        assert zygote.run([f'--config={config}', '--sweep', f'--workdir={alone}', f'--trial={index}', '--quiet'],
                          tmp_path / f'alone{index}.log', {'cpus': [0]}) == 0
    assert cli.main([*command[:3], '--slurm=write']) == 0  # sweep.json (the runner would write the same)
    shutil.copytree(alone / 'jax_cache', workdir / 'jax_cache')

    # Runner A, killed at a random moment once its first trial has checkpoints; before
    # that, a second runner and a second process for a running trial are refused.
    a = _launch(*command)
    folder, running = _wait_for(lambda: next(((d, s) for d, s in _statuses(workdir).items()
                                              if s.get('status') == 'running' and (workdir / d / 'lock.json').exists()),
                                             None))
    trial_status = workdir / 'logs' / f'{folder}.json'
    before = trial_status.read_bytes()
    started = time.time()
    b = subprocess.run([sys.executable, 'launch.py', *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert b.returncode == 2 and b.stderr.count('\n') == 1, b.stderr
    assert f'is in use by pid {a.pid} on host ' in b.stderr and '(sweep)' in b.stderr and time.time() - started < 30
    holder = json.loads((workdir / folder / 'lock.json').read_text())
    trial = subprocess.run([sys.executable, 'launch.py', f'--config={config}', '--sweep', f'--workdir={workdir}',
                            f'--trial={running["index"]}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert trial.returncode == 2 and f"is in use by pid {holder['pid']}" in trial.stderr, trial.stderr
    assert trial_status.read_bytes() == before  # the refused one wrote nothing, not even a status
    _wait_for(lambda: any(os.path.isdir(workdir / d / 'checkpoints' / '5') for d in _trial_dirs(workdir)))
    time.sleep(rng.uniform(0.0, 2.0))
    a.kill()
    a.communicate()
    kills = 1
    # Runner B, killed again a random moment after it started.
    b = _launch(*command)
    time.sleep(rng.uniform(2.0, 8.0))
    if b.poll() is None:
        b.kill()
        kills += 1
    b.communicate()
    # The report reads the sweep whatever state it is in (no lock needed).
    assert cli.main(['--report', f'--workdir={workdir}', f'--report_dir={tmp_path / "report"}']) == 0
    # Runner C finishes; a further run has nothing to do.
    c = subprocess.run([sys.executable, 'launch.py', *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    again = subprocess.run([sys.executable, 'launch.py', *command], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and '3 trials, 3 done, 0 to run' in again.stderr, again.stderr
    assert not (workdir / 'lock.json').exists()

    # Each trial finished exactly once: one results.json write in its log (every start
    # of it appends there), the test split once in its history; and equals the trial run
    # alone, bit for bit.
    steps = FIELDS['train.steps']
    for index, name in enumerate(_trial_dirs(workdir)):
        log = (workdir / 'logs' / f'{name}.log').read_text()
        assert len(re.findall(r'wrote \S+/results\.json', log)) == 1, log[-3000:]
        history = event_history(str(workdir / name))
        assert [s for s, _ in history['test/accuracy']] == [steps], history['test/accuracy']
        assert [s for s, _ in history['eval/loss']] == list(range(10, steps + 1, 10))
        got, ref = json.loads((workdir / name / 'results.json').read_text()), json.loads(
            (alone / name / 'results.json').read_text())
        assert got['metrics'] == ref['metrics'] and got['step'] == ref['step'] == steps
        cfg = config_lib.load(str(config), {'task.seed': str(index + 1)})
        assert_same_tree(restore_state(str(workdir / name), cfg), restore_state(str(alone / name), cfg))
    resumed = sum(len(re.findall('resumed from step', (workdir / 'logs' / f'{n}.log').read_text()))
                  for n in _trial_dirs(workdir))
    print(f'runner killed {kills} times; trials resumed {resumed} times; each finished once')


def test_a_sweep_runner_stopped_before_its_trials_start_returns_and_leaves_them_pending(tmp_path):
    """SIGTERM while the runner is still starting (its fork server not ready, nothing
    running): it must return 128+15 at once, not wait for a queue it will never run."""
    import signal
    experiment = tmp_path / 'exp.py'
    experiment.write_text(EXPERIMENT)
    workdir = tmp_path / 'sweep'
    proc = _launch(f'--config={experiment}', '--sweep', f'--workdir={workdir}', '--parallel=1')
    line = proc.stderr.readline()
    assert '3 trials, 0 done, 3 to run' in line, line
    time.sleep(1)  # its handler is in place; its fork server is still importing jax
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError('the stopped runner did not return') from None
    assert code == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    assert not any(s.get('status') == 'done' for s in _statuses(workdir).values())
