"""Sweep definitions: the helpers' expansions, trial names and folders, sweep.json's
refusal of a changed definition, and the bad inputs that stop a sweep before it runs."""

import json
import os
import subprocess
import sys

import pytest

from flaxformer_lite import cli, sweep
from flaxformer_lite.sweep import plan

from conftest import ROOT

SWEEP_FILE = '''
from flaxformer_lite import sweep
from flaxformer_lite.config import make_config

def get_config(arg=None):
    return make_config(arg, task='recall', defaults={{'train.steps': 5}})

def get_sweep(arg=None):
    return {trials}
'''


def _file(tmp_path, trials, name='exp.py'):
    path = tmp_path / name
    path.write_text(SWEEP_FILE.format(trials=trials))
    return str(path)


def test_product_zip_concat_and_seeds():
    grid = sweep.product({'model.name': ['transformer', 'lstm'], 'model.size': ['tiny', 'mini']}, sweep.seeds(2))
    assert len(grid) == 8 and grid[0] == {'model.name': 'transformer', 'model.size': 'tiny', 'train.seed': 0}
    assert grid[-1] == {'model.name': 'lstm', 'model.size': 'mini', 'train.seed': 1}
    paired = sweep.zip({'model.name': ['gru', 'rnn']}, {'optim.learning_rate': [3e-3, 1e-2]})
    assert paired == [{'model.name': 'gru', 'optim.learning_rate': 3e-3},
                      {'model.name': 'rnn', 'optim.learning_rate': 1e-2}]
    assert sweep.zip({'model.name': ['gru', 'rnn'], 'optim.learning_rate': [3e-3, 1e-2]}) == paired  # fields zip too
    assert sweep.concat(paired, [{'model.name': 'lstm'}]) == paired + [{'model.name': 'lstm'}]
    # A tuple is one value, a list the alternatives.
    assert sweep.product({'eval.dependency_lengths': (16, 32)}) == [{'eval.dependency_lengths': (16, 32)}]
    with pytest.raises(ValueError, match='one length'):
        sweep.zip({'a.b': [1, 2]}, {'c.d': [1]})
    with pytest.raises(ValueError, match='set twice'):
        sweep.product({'a.b': [1]}, {'a.b': [2]})


def test_random_is_seeded_and_stays_in_range():
    dists = {'optim.learning_rate': sweep.log_uniform(1e-4, 1e-2), 'model.dropout': sweep.uniform(0.0, 0.3),
             'model.num_layers': sweep.int_log_uniform(1, 8), 'model.name': sweep.choice('lstm', 'gru'),
             'train.steps': 100}
    a, b = sweep.random(50, seed=3, **dists), sweep.random(50, seed=3, **dists)
    assert a == b and a != sweep.random(50, seed=4, **dists)
    assert all(1e-4 <= t['optim.learning_rate'] <= 1e-2 and 0 <= t['model.dropout'] <= 0.3 for t in a)
    layers = {t['model.num_layers'] for t in a}
    assert layers <= set(range(1, 9)) and {1, 8} & layers and {t['model.name'] for t in a} == {'lstm', 'gru'}
    assert all(t['train.steps'] == 100 for t in a)


def test_isoflop_gives_one_trial_per_size_and_budget():
    trials = sweep.isoflop([1e12, 1e13], ['tiny', 'mini', 'small'])
    assert len(trials) == 6 and trials[0] == {'train.steps': None, 'train.tokens': None, 'train.flops_budget': 1e12,
                                              'model.size': 'tiny'}


def test_trial_names_are_readable_and_folders_safe():
    fields = ['model.name', 'model.size', 'train.seed', 'eval.dependency_lengths', 'optim.learning_rate']
    overrides = {'model.name': 'lstm', 'model.size': 'mini', 'train.seed': 1, 'eval.dependency_lengths': (16, 32),
                 'optim.learning_rate': 0.003}
    name = plan.trial_name(overrides, fields)
    assert name == 'model.name=lstm,model.size=mini,seed=1,eval.dependency_lengths=(16,32),optim.learning_rate=0.003'
    folder = plan.trial_dir(7, name)
    assert folder.startswith('0007_model.name-lstm_model.size-mini_seed-1') and all(
        c.isalnum() or c in '._+-' for c in folder)
    assert len(plan.trial_dir(1, 'x=' + 'y' * 500)) < 130


def test_names_leave_out_fields_another_field_determines():
    trials = sweep.product(sweep.zip({'model.name': ['transformer', 'lstm'], 'optim.learning_rate': [1e-3, 3e-3]}),
                           sweep.zip({'task.dependency_length': [4, 16], 'task.seq_len': [13, 25]}), sweep.seeds(2))
    fields = plan.swept(trials)
    assert fields == ['model.name', 'optim.learning_rate', 'task.dependency_length', 'task.seq_len', 'train.seed']
    assert plan.naming_fields(trials, fields) == ['model.name', 'task.dependency_length', 'train.seed']


def test_changed_definition_is_refused_and_added_trials_extend(tmp_path):
    workdir = str(tmp_path / 'sweep')
    three = _file(tmp_path, "sweep.product({'train.seed': [0, 1, 2]})")
    s = plan.load(three, {}, workdir)
    s.record()
    assert [t.name for t in s.trials] == ['seed=0', 'seed=1', 'seed=2']
    four = _file(tmp_path, "sweep.product({'train.seed': [3, 0, 1, 2]})", 'four.py')
    extended = plan.load(four, {}, workdir)
    assert [(t.index, t.name) for t in extended.trials] == [(0, 'seed=0'), (1, 'seed=1'), (2, 'seed=2'),
                                                             (3, 'seed=3')]
    assert not extended.recorded  # the new trial is recorded when the sweep runs
    two = _file(tmp_path, "sweep.product({'train.seed': [0, 2]})", 'two.py')
    with pytest.raises(cli.UserError, match=r'the sweep definition changed: trial 1 \(seed=1\) is no longer in it'):
        plan.load(two, {}, workdir)
    with pytest.raises(cli.UserError, match='overrides'):
        plan.load(three, {'train.steps': '7'}, workdir)


@pytest.mark.parametrize('trials,flags,message', [
    ("[{'model.nam': 'lstm'}]", [], "unknown config field 'model.nam'; did you mean 'model.name'?"),
    ("[{'train.batch_size': 'big'}]", [], "config field train.batch_size='big'"),
    ('[]', [], 'returned no trials'),
    ("[{'train.tokens': 1e6}]", [], 'train.steps=5 and train.tokens=1e+06 both set the length of the run'),
    ("sweep.seeds(2)", ['--trial=2'], '--trial=2 is out of range: the sweep has trials 0..1'),
    ("sweep.seeds(2)", ['--parallel=0'], '--parallel=0 must be at least 1'),
    ("[{'train.seed': 1}, {'train.seed': 1}]", [], 'trials 0 and 1 are the same'),
    ("sweep.zip({'train.seed': [1, 2]}, {'model.name': ['lstm']})", [], 'one length'),
])
def test_bad_sweeps_are_one_line_before_anything_is_written(tmp_path, capsys, trials, flags, message):
    workdir = tmp_path / 'sweep'
    assert cli.main([f'--config={_file(tmp_path, trials)}', '--sweep', f'--workdir={workdir}', *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1 and err.startswith('error: '), err
    assert not workdir.exists()


def test_a_config_file_without_get_sweep_and_a_report_without_runs(tmp_path, capsys):
    assert cli.main(['--config=configs/recall.py', '--sweep', f'--workdir={tmp_path / "s"}']) == 2
    assert 'defines no get_sweep(arg)' in capsys.readouterr().err
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert cli.main(['--report', f'--workdir={empty}']) == 2
    assert 'holds no runs' in capsys.readouterr().err and os.listdir(empty) == []


def test_dry_run_lists_trials_with_flops_and_writes_nothing(tmp_path):
    path = _file(tmp_path, "sweep.product({'model.name': ['transformer', 'lstm']}, {'model.size': ['tiny', 'mini']})")
    proc = subprocess.run([sys.executable, 'launch.py', f'--config={path}', '--sweep', f'--workdir={tmp_path / "s"}',
                           '--dry_run'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('sweep s: 4 trials') and 'swept: model.name, model.size' in lines[0]
    assert sum('FLOPs (5 steps)' in line for line in lines) == 4 and 'model.name=lstm,model.size=mini' in proc.stdout
    assert not (tmp_path / 's').exists()
