"""A real sweep of tiny trials, two at a time: reruns that skip, resume and retry; a
failing trial recorded without stopping the others; the shared compilation cache; the
trials side by side in a real TensorBoard's HParams tab; the report; and the same
sweep as a job array on a real SLURM."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, TINY_MODEL, TINY_RECALL
from slurm_cluster import slurm, wait_for_job  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slow,  # real sweeps of trial processes, TensorBoard and SLURM
              pytest.mark.xdist_group('slurm')]  # one SLURM cluster for both modules that use it

FIELDS = {**TINY_RECALL, **TINY_MODEL, 'train.steps': 10, 'train.batch_size': 8, 'train.log_every': 5,
          'eval.every_steps': 10, 'eval.num_examples': 16, 'checkpoint.every_steps': 10, 'optim.warmup_steps': 2}
EXPERIMENT = f'''
from flaxformer_lite import sweep
from flaxformer_lite.config import make_config

def get_config(arg=None):  # 'two' selects the sweep's trials only
    return make_config(None, task='recall', defaults={FIELDS!r})

def get_sweep(arg=None):
    trials = sweep.product({{'model.name': ['transformer', 'lstm']}}, {{'task.dependency_length': [3, 4]}})
    if arg == 'two':
        return trials[:2]
    return trials + [{{'model.name': 'transformer', 'model.num_heads': 3}}]  # 32 is not divisible by 3
'''


def _launch(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
    """The sweep, run once: 4 good trials and 1 that cannot run, 2 at a time."""
    root = tmp_path_factory.mktemp('sweep')
    config = root / 'tiny_experiment.py'
    config.write_text(EXPERIMENT)
    workdir = root / 'tvl'
    started = time.time()
    proc = _launch(f'--config={config}', '--sweep', f'--workdir={workdir}', '--parallel=2')
    return dict(config=str(config), workdir=workdir, proc=proc, wall=time.time() - started)


def _statuses(workdir):
    out = {}
    for name in sorted(os.listdir(workdir / 'logs')):
        if name.endswith('.json'):
            out[name[:4]] = json.loads((workdir / 'logs' / name).read_text())
    return out


def _results_mtimes(workdir):
    return {d: os.path.getmtime(workdir / d / 'results.json') for d in os.listdir(workdir)
            if (workdir / d / 'results.json').exists()}


def test_the_good_trials_finish_and_the_failing_one_is_recorded(swept):
    proc, workdir = swept['proc'], swept['workdir']
    assert proc.returncode == 1, proc.stderr  # one trial failed
    statuses = _statuses(workdir)
    assert [s['status'] for s in statuses.values()] == ['done'] * 4 + ['failed']
    assert statuses['0004']['exit_code'] == 2 and 'not divisible by model.num_heads=3' in statuses['0004']['error']
    for index in range(4):
        (trial,) = [d for d in os.listdir(workdir) if d.startswith(f'000{index}_')]
        results = json.loads((workdir / trial / 'results.json').read_text())
        assert results['status'] == 'done' and 'test/accuracy' in results['metrics']
    table = proc.stderr.split('  #  status')[1]
    assert table.count('done') == 4 and 'failed' in table and '[4/5 done, 0 running, 1 failed, 0 left' in proc.stderr
    sweep_json = json.loads((workdir / 'sweep.json').read_text())
    assert sweep_json['swept_fields'] == ['model.name', 'task.dependency_length', 'model.num_heads']


def test_a_rerun_trains_nothing_done_and_retries_the_failed(swept):
    workdir = swept['workdir']
    before = _results_mtimes(workdir)
    proc = _launch(f'--config={swept["config"]}', '--sweep', f'--workdir={workdir}', '--parallel=2')
    assert proc.returncode == 1 and '4 done, 1 to run' in proc.stderr, proc.stderr
    assert _results_mtimes(workdir) == before
    log = next(p for p in (workdir / 'logs').iterdir() if p.name.startswith('0004') and p.suffix == '.log')
    assert log.read_text().count('not divisible by model.num_heads=3') == 2  # tried again


def test_deleting_one_trials_results_reruns_that_trial_only(swept):
    workdir = swept['workdir']
    (one,) = [d for d in os.listdir(workdir) if d.startswith('0001_')]
    os.remove(workdir / one / 'results.json')
    before = _results_mtimes(workdir)
    env = dict(os.environ, JAX_LOG_COMPILES='1')  # cache hits are then logged as warnings
    proc = _launch(f'--config={swept["config"]}', '--sweep', f'--workdir={workdir}', '--parallel=2', env=env)
    assert '3 done, 2 to run' in proc.stderr, proc.stderr
    after = _results_mtimes(workdir)
    assert set(after) == set(before) | {one} and all(after[d] == before[d] for d in before)
    log = (workdir / 'logs' / f'{one}.log').read_text()
    # The run had finished: its checkpoint is there, so only the test evaluation and
    # results.json are redone; their compiled programs come from the sweep's cache.
    assert "Persistent compilation cache hit for 'jit_eval_step'" in log, log[-3000:]


def test_a_new_trial_of_an_existing_shape_hits_the_compilation_cache(swept, tmp_path):
    workdir = swept['workdir']
    env = dict(os.environ, JAX_LOG_COMPILES='1')
    # Trial 0 again from scratch: move its folder away, so the runner finds it pending.
    (zero,) = [d for d in os.listdir(workdir) if d.startswith('0000_')]
    os.rename(workdir / zero, tmp_path / zero)
    proc = _launch(f'--config={swept["config"]}', '--sweep', '--trial=0', f'--workdir={workdir}', env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" in proc.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _post(port, path, body):
    request = urllib.request.Request(f'http://127.0.0.1:{port}/data/plugin/hparams/{path}',
                                     data=json.dumps(body).encode(), headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_hparams_show_swept_fields_first_readable_names_and_metrics(swept):
    workdir, port = swept['workdir'], _free_port()
    board = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', str(workdir), '--host',
                              '127.0.0.1', '--port', str(port), '--reload_interval', '1'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = {'experimentName': '', 'allowedStatuses': ['STATUS_UNKNOWN', 'STATUS_SUCCESS', 'STATUS_FAILURE',
                                                           'STATUS_RUNNING'], 'colParams': [], 'startIndex': 0,
                 'sliceSize': 100}
        groups, deadline = [], time.time() + 90
        while time.time() < deadline:
            try:
                groups = _post(port, 'session_groups', query).get('sessionGroups', [])
                if len(groups) >= 4:
                    break
            except OSError:
                pass
            time.sleep(1)
        experiment = _post(port, 'experiment', {'experimentName': ''})
    finally:
        board.terminate()
        board.wait(timeout=30)
    names = sorted(g['name'] for g in groups)
    assert names == [f'tvl/{m} L{d} h2' for m in ('lstm', 'xfmr') for d in (3, 4)]
    first = [h.get('displayName') or h['name'] for h in experiment['hparamInfos'][:5]]
    assert first == ['model.name', 'model.size', 'task.name', 'model.num_heads', 'task.dependency_length'], first
    metrics = [m['name']['tag'] for m in experiment['metricInfos']]
    assert {'test/accuracy', 'eval/accuracy', 'train/loss'} <= set(metrics)
    for group in groups:
        values = {m['name']['tag']: m['value'] for m in group['metricValues']}
        assert set(values) == set(metrics), group['name']  # no empty cell
        assert group['hparams']['sweep'] == 'tvl'


def test_report_over_the_sweep_writes_tables_and_plots(swept, tmp_path):
    out = tmp_path / 'report'
    proc = _launch('--report', f'--workdir={swept["workdir"]}', f'--report_dir={out}')
    assert proc.returncode == 0, proc.stderr
    assert (out / 'report.md').exists() and (out / 'results.csv').exists()
    text = (out / 'report.md').read_text()
    assert 'model.num_heads=3' in text and 'failed' in text  # the failed trial is listed
    csv = (out / 'results.csv').read_text().splitlines()
    assert len(csv) == 1 + 5 and 'test/accuracy' in csv[0]
    pngs = [p for p in os.listdir(out) if p.endswith('.png')]
    assert 'accuracy_vs_dependency_length.png' in pngs and f'({pngs[0]})' in text and all((out / p).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' for p in pngs)


def test_the_sweep_runs_as_a_slurm_job_array(slurm, tmp_path):  # noqa: F811
    config = tmp_path / 'tiny_experiment.py'
    config.write_text(EXPERIMENT)
    workdir = tmp_path / 'on_slurm'
    proc = _launch(f'--config={config}:two', '--sweep', f'--workdir={workdir}', '--slurm',
                   '--slurm_args=--time=10:00', env=slurm['env'])
    assert proc.returncode == 0, proc.stderr
    script = (workdir / 'sweep.sbatch').read_text()
    assert '#SBATCH --array=0-1' in script and '#SBATCH --time=10:00' in script
    job = proc.stderr.split('submitted job ')[1].split(';')[0].split()[0]
    wait_for_job(slurm, job, timeout=480)
    for trial in ('0000_task.dependency_length-3', '0001_task.dependency_length-4'):  # model.name is not swept
        results = json.loads((workdir / trial / 'results.json').read_text())
        assert results['status'] == 'done' and 'test/accuracy' in results['metrics']
    assert len([p for p in os.listdir(workdir / 'logs') if p.startswith('slurm-')]) == 2
    again = _launch(f'--config={config}:two', '--sweep', f'--workdir={workdir}', '--slurm', env=slurm['env'])
    assert again.returncode == 0 and 'every trial is done; nothing to submit' in again.stderr


TUNED = f'''
from flaxformer_lite import sweep
from flaxformer_lite.config import make_config

def get_config(arg=None):
    return make_config(None, task='recall', defaults={FIELDS!r})

def get_sweep(arg=None):
    main = sweep.product({{'task.dependency_length': [3, 4]}})
    return sweep.tuned(main, {{'optim.learning_rate': [1e-3, 1e-2]}}, by=('task.dependency_length',), extend=False)
'''


def test_a_tuned_sweep_runs_as_two_dependent_job_arrays(slurm, tmp_path):  # noqa: F811
    """--slurm submits the tuning trials as one array and the main trials as a second that
    waits for it (afterok); the second array's tasks make the choice and run with it."""
    config = tmp_path / 'tuned_experiment.py'
    config.write_text(TUNED)
    workdir = tmp_path / 'tuned_on_slurm'
    proc = _launch(f'--config={config}', '--sweep', f'--workdir={workdir}', '--slurm', '--slurm_args=--time=10:00',
                   env=slurm['env'])
    assert proc.returncode == 0, proc.stderr
    tune_job, main_job = re.search(r'submitted tuning job (\d+) and main job (\d+)', proc.stderr).groups()
    shown = subprocess.run(['scontrol', 'show', 'job', main_job], env=slurm['env'], capture_output=True, text=True,
                           timeout=30).stdout
    assert 'afterok' in shown and tune_job in shown, shown
    wait_for_job(slurm, main_job, timeout=480)
    record = json.loads((workdir / 'tuning.json').read_text())
    chosen = {g['group']['task.dependency_length']: g['chosen'] for g in record['groups']}
    assert set(chosen) == {3, 4} and record['metric'] == 'eval/loss'
    mains = [d for d in os.listdir(workdir) if d[:4].isdigit()]
    assert len(mains) == 2
    for d in mains:
        results = json.loads((workdir / d / 'results.json').read_text())
        assert results['status'] == 'done'
        assert results['config']['optim.learning_rate'] == chosen[results['config']['task.dependency_length']]
