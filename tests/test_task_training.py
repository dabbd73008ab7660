"""Every task trains through launch.py with a Transformer and an LSTM (a few steps).
(That every family learns a dependency is tests/test_learning.py.)"""

import math

import pytest

from flaxformer_lite import cli

from conftest import read_scalars

pytestmark = pytest.mark.slow  # every task trained to a threshold

TASKS = [('recall', 'recall'), ('copy', 'copy'), ('copy', 'selective_copy'), ('associative', 'mqar'),
         ('associative', 'induction'), ('adding', 'adding'), ('listops', 'listops'), ('agreement', 'agreement'),
         ('formal', 'parity'), ('formal', 'dyck'), ('text_lm', 'text_lm'), ('seq2seq', 'seq2seq')]
FEW_STEPS = ['--config.train.steps=3', '--config.train.log_every=1', '--config.eval.every_steps=3',
             '--config.eval.num_examples=8', '--config.train.batch_size=4', '--config.checkpoint.every_steps=3',
             '--config.model.size=tiny', '--quiet']


@pytest.mark.parametrize('model', ['transformer', 'lstm'])
@pytest.mark.parametrize('config,task', TASKS, ids=[t for _, t in TASKS])
def test_every_task_trains_with_every_family(config, task, model, tmp_path, capsys):
    workdir = tmp_path / 'run'
    rc = cli.main([f'--config=configs/{config}.py:quick,task={task},model={model}', f'--workdir={workdir}',
                      *FEW_STEPS])
    assert rc == 0, capsys.readouterr().err
    scalars = read_scalars(str(workdir))
    assert len(scalars['train/loss']) == 3 and all(math.isfinite(v) for v in scalars['train/loss'].values())
    metric = 'eval/mse' if task == 'adding' else 'eval/accuracy'
    assert 3 in scalars[metric]
    if task == 'seq2seq':
        assert 0.0 <= scalars['eval/exact_match'][3] <= 1.0
    if task == 'text_lm':
        assert 'eval/loss_at_position/00001' in scalars
