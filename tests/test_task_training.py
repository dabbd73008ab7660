"""Every task trains through launch.py (a few steps) with a Transformer, and the task
whose head no other test trains through it (adding's regression) with an LSTM too.
tests/test_pinned_behaviour.py trains every family through launch.py on recall, agreement,
listops and seq2seq, held to its recorded losses; tests/test_learning.py shows every
family learn a dependency."""

import math

import pytest

from flaxformer_lite import cli

from conftest import read_scalars

pytestmark = pytest.mark.slow  # every task trained to a threshold

TASKS = [('copy', 'copy'), ('copy', 'selective_copy'), ('associative', 'mqar'), ('associative', 'induction'),
         ('adding', 'adding'), ('listops', 'listops'), ('agreement', 'agreement'), ('formal', 'parity'),
         ('formal', 'dyck'), ('text_lm', 'text_lm')]
FEW_STEPS = ['--config.train.steps=3', '--config.train.log_every=1', '--config.eval.every_steps=3',
             '--config.eval.num_examples=8', '--config.train.batch_size=4', '--config.checkpoint.every_steps=3',
             '--config.model.size=tiny', '--quiet']


RUNS = [(config, task, 'transformer') for config, task in TASKS] + [('adding', 'adding', 'lstm')]


@pytest.mark.parametrize('config,task,model', RUNS, ids=[f'{t}-{m}' for _, t, m in RUNS])
def test_every_task_trains(config, task, model, tmp_path, capsys):
    workdir = tmp_path / 'run'
    rc = cli.main([f'--config=configs/{config}.py:quick,task={task},model={model}', f'--workdir={workdir}',
                      *FEW_STEPS])
    assert rc == 0, capsys.readouterr().err
    scalars = read_scalars(str(workdir))
    assert len(scalars['train/loss']) == 3 and all(math.isfinite(v) for v in scalars['train/loss'].values())
    metric = 'eval/mse' if task == 'adding' else 'eval/accuracy'
    assert 3 in scalars[metric]
    if task == 'text_lm':
        assert 'eval/loss_at_position/00001' in scalars
