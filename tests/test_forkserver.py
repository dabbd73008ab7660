"""The fork server and the sweep runner's scheduling: a child runs a call (here `launch.py`'s
command line, for the runner a sweep trial's entry point) as a fresh process would (its exit status, its output in the log, the CPUs it was given), a
signalled child stops as a trial process does (SIGTERM: checkpoint, then 143), the
server's death stops its children, FLAXFORMER_FORK_SERVER=0 turns it off (each trial then
a subprocess the runner gives the log to; with the server, only the child opens it); a trial
that differs from a running one only in its seed waits while others can start."""

import os
import signal
import time

import pytest

from conftest import ROOT, TINY_MODEL, TINY_RECALL, TINY_TRAIN, shared_jax_cache  # noqa: F401  (a fixture)

from flaxformer_lite.runtime import forkserver
from flaxformer_lite.sweep import runner


CLI = 'flaxformer_lite.cli:main'  # what launch.py runs


def _override(fields):
    return [f'--config.{k}={v}' for k, v in fields.items()]


def _long_run(workdir):
    """A tiny training that runs for minutes unless stopped, checkpointing every 5 steps."""
    fields = {**TINY_RECALL, **TINY_MODEL, **TINY_TRAIN, 'train.steps': 100000, 'checkpoint.every_steps': 5,
              'eval.every_steps': 100000}
    return [f'--config={ROOT}/configs/recall.py', f'--workdir={workdir}', *_override(fields)]


def _wait(predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value is not None and value is not False:
            return value
        time.sleep(0.1)
    raise AssertionError('timed out')


@pytest.fixture
def server(monkeypatch, shared_jax_cache):
    """A fork server whose children share the session's compilation cache (through jax's
    environment variables), so the second long run reads what the first compiled."""
    monkeypatch.chdir(ROOT)
    env = dict(runner.child_env(), JAX_COMPILATION_CACHE_DIR=shared_jax_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    started = forkserver.ForkServer.start(env, preload=('flaxformer_lite.cli',))
    assert started is not None
    yield started
    started.close()


def test_a_child_exits_as_launch_would_with_its_output_in_the_log(server, tmp_path):
    log = tmp_path / 'bad.log'
    child = server.spawn(CLI, ['--config=configs/recall.py', '--config.train.stepz=3', '--describe'], str(log), {0})
    assert _wait(child.poll) == 2
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and 'train.stepz' in lines[0] and 'train.steps' in lines[0], lines
    good = server.spawn(CLI, ['--config=configs/recall.py', '--describe'], str(tmp_path / 'good.log'), {0})
    assert _wait(good.poll, timeout=60) is not None and good.poll() == 0
    assert 'parameters' in (tmp_path / 'good.log').read_text()


def test_a_signalled_child_saves_and_stops_on_the_cpus_it_was_given(server, tmp_path):
    cpus = {sorted(os.sched_getaffinity(0))[-1]}
    workdir = tmp_path / 'run'
    child = server.spawn(CLI, _long_run(workdir), str(tmp_path / 'run.log'), cpus)
    _wait(lambda: (workdir / 'checkpoints').is_dir() and any(n.isdigit() for n in os.listdir(workdir / 'checkpoints')))
    with open(f'/proc/{child.pid}/status') as f:
        allowed = next(line for line in f if line.startswith('Cpus_allowed_list:')).split()[1]
    assert allowed == str(next(iter(cpus)))
    child.send_signal(signal.SIGTERM)
    assert _wait(child.poll, timeout=120) == 128 + signal.SIGTERM, (tmp_path / 'run.log').read_text()[-2000:]
    assert 'by a signal; checkpoint saved' in (tmp_path / 'run.log').read_text()


def test_the_servers_death_stops_its_children(server, tmp_path):
    workdir = tmp_path / 'run'
    child = server.spawn(CLI, _long_run(workdir), str(tmp_path / 'run.log'), set(os.sched_getaffinity(0)))
    _wait(lambda: (workdir / 'checkpoints').is_dir())
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    # The child got SIGTERM: it saves and exits; the dead server cannot say how, so the
    # runner counts it as not done (1), and results.json was never written.
    assert _wait(child.poll, timeout=120) == 1
    assert not forkserver._running(child.pid)
    assert not (workdir / 'results.json').exists()
    assert server.spawn(CLI, ['--describe'], str(tmp_path / 'x.log'), {0}) is None  # the runner then uses Popen


def test_the_switch_turns_the_server_off(monkeypatch):
    monkeypatch.setenv(forkserver.ENV_SWITCH, '0')
    assert forkserver.ForkServer.start(runner.child_env()) is None


def _one_trial_sweep(tmp_path, trial):
    from flaxformer_lite.sweep import plan
    config = tmp_path / 'one_trial.py'
    config.write_text(f'''
from flaxformer_lite.config import make_config

def get_config(arg=None):
    return make_config(None, task='recall', defaults={{**{TINY_RECALL!r}, **{TINY_MODEL!r}}})

def get_sweep(arg=None):
    return [{trial!r}]
''')
    sweep = plan.load(str(config), {}, str(tmp_path / 'sweep'))
    sweep.record()
    return sweep, sweep.trials[0]


def test_without_the_server_a_trial_runs_as_a_subprocess_with_its_output_in_the_log(monkeypatch, tmp_path):
    monkeypatch.setenv(forkserver.ENV_SWITCH, '0')
    sweep, trial = _one_trial_sweep(tmp_path, {'model.num_heads': 3})  # 32 is not divisible by 3: stops at once
    assert runner.run_local(sweep, parallel=1) == 1
    status = runner.read_status(sweep, trial)
    assert status['status'] == 'failed' and status['exit_code'] == 2, status
    assert 'not divisible by model.num_heads=3' in open(runner.log_path(sweep, trial)).read()


def test_with_the_server_the_runner_leaves_the_log_to_it(monkeypatch, tmp_path):
    class Done:  # a forked child that has already exited
        def poll(self):
            return 0

    class Server:
        def spawn(self, call, argv, log, cpus):
            assert call == runner.TRIAL_CALL and argv[:2] == [f'--workdir={os.path.abspath(sweep.root)}', '--trial=0']
            return Done()

        def close(self):
            pass

    monkeypatch.setattr(runner.ForkServer, 'start', classmethod(lambda cls, env, **kw: Server()))
    sweep, trial = _one_trial_sweep(tmp_path, {'model.num_heads': 4})
    assert runner.run_local(sweep, parallel=1) == 0
    assert not os.path.exists(runner.log_path(sweep, trial))  # only the server's child writes it


def test_a_seed_twin_waits_while_other_trials_can_start():
    def trial(i, **overrides):
        return runner.TrialSpec(index=i, name=str(i), dir=str(i), overrides=overrides)
    a0, a1 = trial(0, **{'model.name': 'lstm', 'train.seed': 0}), trial(1, **{'model.name': 'lstm', 'train.seed': 1})
    b0 = trial(2, **{'model.name': 'gru', 'train.seed': 0})
    assert runner._next_trial([a1, b0], running=[a0]) is b0  # a1 would compile what a0 compiles
    assert runner._next_trial([a1, b0], running=[]) is a1
    assert runner._next_trial([a1], running=[a0]) is a1  # nothing else to do: do not idle
    assert runner._next_trial([], running=[a0]) is None
