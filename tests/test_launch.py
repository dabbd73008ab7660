"""The command line as a user meets it: exit status 2 and one line for mistakes,
--describe and --show_examples, and the workdir left untouched on errors."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

from flaxformer_lite import cli


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_unknown_config_key_is_one_line_exit_2(tmp_path):
    workdir = tmp_path / 'w'
    proc = _run('--config=configs/recall.py:quick', f'--workdir={workdir}', '--config.train.stepz=5')
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config field 'train.stepz'; did you mean 'train.steps'?"
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert not workdir.exists()


@pytest.mark.parametrize('args,message', [
    (['--config=configs/recall.py', '--wrkdir=x'], "unknown flag '--wrkdir=x'; did you mean --workdir?"),
    (['--config=configs/missing.py', '--describe'], "config file 'configs/missing.py' does not exist"),
    (['--config=configs/recall.py:model=lsmt', '--describe'], "model.name='lsmt' is not a known model"),
    (['--config=configs/recall.py', '--config.model.d_model=66', '--describe'],
     'model.d_model: 66 is not divisible by model.num_heads=4'),
    (['--config=configs/recall.py', '--config.task.dependency_length=100', '--describe'],
     'task.seq_len: seq_len=64 cannot hold'),
    (['--config=configs/recall.py', '--config.task.num_pairs=40', '--describe'], 'task.num_pairs'),
    (['--config=configs/recall.py', '--config.train.steps'], 'needs a value'),
    (['--describe'], '--config=FILE.py[:ARG] is required'),
    (['--config=configs/recall.py'], '--workdir=DIR is required'),
])
def test_user_errors_exit_2_with_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count('\n') == 1 and err.startswith('error: ')


def test_describe_prints_config_and_counts(capsys):
    assert cli.main(['--config=configs/recall.py:size=mini', '--describe']) == 0
    out = capsys.readouterr().out
    assert '"d_model": 128' in out
    assert 'non-embedding' in out and 'per token' in out
    assert '(analytic counts equal to the parameter tree)' in out


def test_show_examples(capsys):
    assert cli.main(['--config=configs/recall.py', '--show_examples=2']) == 0
    out = capsys.readouterr().out
    assert out.count('input:') == 2 and out.count('target:') == 2 and '->' in out


def test_bad_override_leaves_existing_run_untouched(tmp_path, capsys):
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'config.json').write_text('{"model": {"name": "transformer"}}')
    before = (workdir / 'config.json').read_text()
    assert cli.main(['--config=configs/recall.py', f'--workdir={workdir}', '--config.model.name=lstmm']) == 2
    assert (workdir / 'config.json').read_text() == before and os.listdir(workdir) == ['config.json']
