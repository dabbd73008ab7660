"""End to end through the one training loop: exact resume, event files,
compilation count, and workdirs that must be refused."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from flaxformer_lite import resolve
from flaxformer_lite.errors import UserError
from flaxformer_lite.train import train_and_evaluate

from conftest import read_scalars, tiny_config

REQUIRED_TAGS = ['train/loss', 'train/accuracy', 'train/learning_rate', 'train/grad_norm', 'train/tokens_per_sec',
                 'eval/loss', 'eval/accuracy']


def _train(cfg, workdir):
    return train_and_evaluate(resolve.from_config(cfg), workdir, verbose=False)


def test_resume_equals_uninterrupted_run(tmp_path):
    common = dict(train__steps=20, optim__decay_steps=20, train__log_every=2, eval__every_steps=10,
                  checkpoint__every_steps=5, model__dropout=0.1)
    straight = str(tmp_path / 'straight')
    _train(tiny_config(**common), straight)
    stopped = str(tmp_path / 'stopped')
    _train(tiny_config(**{**common, 'train__steps': 10}), stopped)
    assert sorted(os.listdir(os.path.join(stopped, 'checkpoints'))) == ['10', '5']
    _train(tiny_config(**common), stopped)  # raising train.steps continues the run
    a, b = read_scalars(straight), read_scalars(stopped)
    for tag in ('train/loss', 'train/grad_norm', 'eval/loss', 'eval/accuracy'):
        assert a[tag] == b[tag], tag  # identical floats, resumed or not
    assert set(a['train/loss']) == set(range(2, 21, 2))


def test_event_files_hold_tags_config_and_hparams(workdir):
    _train(tiny_config(), workdir)
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(workdir)
    acc.Reload()
    tags = acc.Tags()['tensors']
    for tag in REQUIRED_TAGS + ['config']:
        assert tag in tags, tag
    content = acc.PluginTagToContent('hparams')
    experiment_pb = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment'])
    hparam_names = {h.name for h in experiment_pb.experiment.hparam_infos}
    assert {'1 model.name', 'train.steps', 'task.dependency_length', 'optim.learning_rate'} <= hparam_names
    metric_tags = {m.name.tag for m in experiment_pb.experiment.metric_infos}
    assert {'eval/loss', 'eval/accuracy'} <= metric_tags
    session = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info'])
    assert session.session_start_info.hparams['1 model.name'].string_value == 'transformer'
    assert session.session_start_info.hparams['train.steps'].number_value == 20
    saved = json.load(open(os.path.join(workdir, 'config.json')))
    assert saved['model']['d_model'] == 32 and saved['model']['arch'] == 'decoder_only'


def test_train_step_compiles_once(workdir, caplog):
    caplog.set_level(logging.WARNING)
    with jax.log_compiles():
        _train(tiny_config(train__steps=12, eval__every_steps=4), workdir)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Compiling jit(')]
    assert sum('jit(train_step)' in m for m in compiles) == 1, compiles
    assert sum('jit(eval_step)' in m for m in compiles) == 1, compiles


def test_runs_that_differ_only_in_learning_rate_share_one_compiled_step(tmp_path, caplog, private_compilation_cache):
    """The peak learning rate is an input of the step, not a constant in it: the second
    run's train step comes from the persistent compilation cache the first one wrote,
    and it still trains at its own rate."""
    caplog.set_level(logging.WARNING)
    runs = {}
    with jax.log_compiles():
        for lr in (2.5e-3, 7e-4):
            caplog.clear()
            _train(tiny_config(optim__learning_rate=lr, train__steps=10, eval__every_steps=10), str(tmp_path / str(lr)))
            runs[lr] = [r.getMessage() for r in caplog.records]
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    assert not any(hit in m for m in runs[2.5e-3]) and any(hit in m for m in runs[7e-4]), runs[7e-4]
    a, b = (read_scalars(str(tmp_path / str(lr))) for lr in (2.5e-3, 7e-4))
    rate_a, rate_b = a['train/learning_rate'], b['train/learning_rate']
    assert rate_a.keys() == rate_b.keys() and all(np.isclose(rate_b[s] * 2.5e-3, rate_a[s] * 7e-4, rtol=1e-5)
                                                  for s in rate_a)
    assert a['train/loss'][10] != b['train/loss'][10]  # the updates used each run's own rate


def _snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[p] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def test_workdir_of_another_run_is_refused_and_left_alone(workdir):
    _train(tiny_config(train__steps=5, eval__every_steps=5, checkpoint__every_steps=5), workdir)
    before = _snapshot(workdir)
    with pytest.raises(UserError, match=r"holds a run with model.d_model=32, not 48"):
        _train(tiny_config(train__steps=5, model__d_model=48), workdir)
    with pytest.raises(UserError, match="task.num_pairs"):
        _train(tiny_config(train__steps=5, task__num_pairs=1, task__num_queries=1), workdir)
    assert _snapshot(workdir) == before


def test_foreign_or_file_workdir_is_refused(tmp_path):
    foreign = tmp_path / 'thesis'
    foreign.mkdir()
    (foreign / 'chapter1.tex').write_text('precious')
    with pytest.raises(UserError, match='holds no flaxformer_lite run'):
        _train(tiny_config(), str(foreign))
    assert os.listdir(foreign) == ['chapter1.tex']
    afile = tmp_path / 'notes.txt'
    afile.write_text('x')
    with pytest.raises(UserError, match='is a file'):
        _train(tiny_config(), str(afile))
    assert afile.read_text() == 'x'


@pytest.mark.slow  # signals a real run and resumes it
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import ROOT
    workdir = tmp_path / 'run'

    def command(steps):
        return [sys.executable, '-u', 'launch.py', '--config=configs/recall.py:quick', f'--workdir={workdir}',
                f'--config.train.steps={steps}', '--config.train.log_every=1', '--config.eval.every_steps=400',
                '--config.checkpoint.every_steps=400', '--config.eval.num_examples=16', '--config.model.size=tiny',
                '--config.model.d_model=32']

    proc = subprocess.Popen(command(400), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith('step 5/'):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert 'checkpoint saved' in rest
    (saved,) = os.listdir(workdir / 'checkpoints')
    assert 5 <= int(saved) < 400
    done = subprocess.run(command(int(saved) + 3), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f'resumed from step {saved}' in done.stderr
    assert max(read_scalars(str(workdir))['train/loss']) == int(saved) + 3


@pytest.mark.parametrize('model', ['transformer', 'lstm'])
def test_seeds_share_one_compiled_init_and_draw_different_weights(model):
    """The seed's key is an argument of the jitted init, not a constant in it: trials that
    differ only in train.seed compile one program (a sweep's cache hit), yet start apart."""
    from flaxformer_lite.train import setup as setup_lib
    setups = [setup_lib.build(resolve.from_config(tiny_config(model=model, train__seed=s))) for s in (0, 1)]
    programs = [jax.jit(s.init_fn).lower(s.rng).as_text() for s in setups]
    assert programs[0] == programs[1]
    first, second = (jax.tree.leaves(s.init_state().params) for s in setups)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
