"""What a person reads in TensorBoard and on the console: short trial names that tell
every run apart, the HParams columns in the order TensorBoard will show and tick them,
a `sweep` value on every run, no sequence accuracy where it means nothing, a one-line
layout on one device, a refused workdir that names the field the user changed, no
Orbax warning when a checkpoint is opened read-only, and the closing lines of a run."""

import itertools
import json
import logging
import os

import jax
import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, backend_context, plugin_data_pb2

from flaxformer_lite import config as config_lib
from flaxformer_lite import resolve, sharding, tracking
from flaxformer_lite.errors import UserError
from flaxformer_lite.train import checkpoint, evaluate, loop

from conftest import ROOT, read_scalars, tiny_config

TINY_RUN = dict(train__steps=2, train__log_every=1, eval__every_steps=2, checkpoint__every_steps=2,
                eval__num_examples=16)


def _values(**fields):
    """A run's flattened config and counts, as the training loop declares them."""
    cfg = config_lib.flatten(tiny_config().to_dict())
    cfg.update({k.replace('__', '.'): v for k, v in fields.items()})
    return {'sweep': tracking.NO_SWEEP, **cfg, 'accounting.params_total': 1000.0,
            'accounting.params_non_embedding': 600.0, 'accounting.flops_per_example': 1e6,
            'accounting.flops_per_token': 1e5, 'accounting.params_embedding': 400.0}


# -- trial names ---------------------------------------------------------------------


def test_trial_ids_are_short_readable_and_unique_within_and_across_sweeps():
    swept = ['model.name', 'model.size', 'task.dependency_length', 'train.seed']
    ids = {}
    for sweep, name, size, dep, seed in itertools.product(('tvl', 'tvl2'), ('lstm', 'transformer'), ('mini', 'tiny'),
                                                          (16, 64), (0, 1)):
        values = _values(model__name=name, model__size=size, task__dependency_length=dep, train__seed=seed)
        ids[(sweep, name, size, dep, seed)] = tracking.trial_id(sweep, values, swept)
    assert len(set(ids.values())) == len(ids)  # no two runs share a row
    assert ids[('tvl', 'lstm', 'mini', 16, 1)] == 'tvl/lstm mini L16 s1'
    assert ids[('tvl2', 'transformer', 'tiny', 64, 0)] == 'tvl2/xfmr tiny L64 s0'
    # What every trial shares (here the size and the seed) is left out: the column is narrow.
    values = _values(model__name='lstm', model__size='mini', task__dependency_length=16, train__seed=1)
    assert tracking.trial_id('tvl', values, ['model.name', 'task.dependency_length']) == 'tvl/lstm L16'
    # TensorBoard's Trial ID column shows about 16 characters: a two-field sweep fits.
    values = _values(model__name='transformer', task__dependency_length=64)
    assert len(tracking.trial_id('tvl', values, ['model.name', 'task.dependency_length'])) <= 16


def test_trial_ids_show_every_swept_value_in_short_form():
    swept = ['task.name', 'model.d_model', 'model.dropout', 'optim.learning_rate', 'eval.dependency_lengths']
    values = _values(model__name='gru', model__size='tiny', task__name='copy', model__d_model=48,
                     model__dropout=0.1, optim__learning_rate=3e-5, eval__dependency_lengths=(16, 32), train__seed=2)
    assert tracking.trial_id('s', values, swept) == 's/gru copy d48 dropout=0.1 lr3e-5 dependency_lengths=16,32'
    # Two swept fields with one last name keep their full names apart.
    values.update({'task.seed': 7})
    assert tracking.trial_id('s', values, ['task.seed', 'train.seed']) == 's/gru task.seed=7 s2'


# -- HParams columns -------------------------------------------------------------------


def _as_tensorboard_shows(columns):
    """(display names in TensorBoard's column order, the ones it ticks): its backend sorts
    the declared columns by (differs first, name); its page keeps that order (a stable
    sort by differs) and ticks the first five."""
    experiment_pb = api_pb2.Experiment(hparam_infos=[info for _, info in columns])
    backend_context._sort_and_reduce_to_hparams_limit(experiment_pb)  # noqa: SLF001 -- TensorBoard's own order
    shown = [info.display_name or info.name for info in experiment_pb.hparam_infos]
    return shown, shown[:5]


def test_hparams_show_family_size_task_swept_fields_then_parameter_counts():
    values = _values(model__name='lstm', model__size='mini')
    shown, ticked = _as_tensorboard_shows(tracking.hparam_columns(values, ['model.name', 'train.seed']))
    assert ticked == ['model.name', 'model.size', 'task.name', 'train.seed', 'params_non_embedding']
    assert shown[5] == 'params_total'
    assert not any(name.startswith('accounting.flops') for name in ticked)
    # A single run: the parameter counts follow the task at once.
    _, ticked = _as_tensorboard_shows(tracking.hparam_columns(values))
    assert ticked == ['model.name', 'model.size', 'task.name', 'params_non_embedding', 'params_total']


def test_a_column_is_named_after_its_field_alone():
    """Whichever run's declaration TensorBoard reads, every run has a value for every
    column: single runs and the trials of any sweep name their columns alike."""
    values = _values()
    single = tracking.hparam_columns(values)
    trial = tracking.hparam_columns(dict(values, sweep='tvl'), ['task.dependency_length', 'optim.learning_rate'])
    assert {i.name for _, i in single} == {i.name for _, i in trial}
    assert {f: i.name for f, i in single} == {f: i.name for f, i in trial}


def _hparams_of(workdir):
    acc = EventAccumulator(str(workdir))
    acc.Reload()
    content = acc.PluginTagToContent('hparams')
    declared = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment']).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info']).session_start_info
    return declared, session


def test_single_runs_and_sweep_trials_declare_the_same_columns_and_fill_every_one(tmp_path):
    cfg = tiny_config(**TINY_RUN)
    exp = resolve.from_config(cfg)
    loop.train_and_evaluate(exp, str(tmp_path / 'single'), verbose=False)
    info = loop.RunInfo(name='model.name=transformer,seed=0', first=('model.name', 'train.seed'),
                        extra={'sweep': 'tvl'})
    loop.train_and_evaluate(exp, str(tmp_path / 'tvl' / '0000_trial'), verbose=False, info=info)
    single_declared, single = _hparams_of(tmp_path / 'single')
    trial_declared, trial = _hparams_of(tmp_path / 'tvl' / '0000_trial')
    columns = {h.name for h in single_declared.hparam_infos}
    assert columns == {h.name for h in trial_declared.hparam_infos}
    assert set(single.hparams) == columns and set(trial.hparams) == columns  # no empty cell, `sweep` included
    assert single.hparams['sweep'].string_value == tracking.NO_SWEEP
    assert trial.hparams['sweep'].string_value == 'tvl'
    assert single.group_name == 'single'  # a single run: its workdir's name
    assert trial.group_name == 'tvl/xfmr s0'
    assert trial.hparams['1 model.name'].string_value == 'transformer'
    assert trial.hparams['4 params_non_embedding'].number_value > 0


# -- metrics -----------------------------------------------------------------------------


def test_text_lm_logs_and_declares_no_sequence_accuracy(tmp_path):
    text = tmp_path / 'corpus.txt'
    text.write_text('the quick brown fox jumps over the lazy dog. ' * 400)
    cfg = tiny_config(task='text_lm', task__files=str(text), task__seq_len=16, **TINY_RUN)
    exp = resolve.from_config(cfg)
    declared = evaluate.metric_names(exp)
    assert declared == ['eval/loss', 'eval/accuracy', 'test/loss', 'test/accuracy']
    loop.train_and_evaluate(exp, str(tmp_path / 'lm'), verbose=False)
    logged = {t for t in read_scalars(str(tmp_path / 'lm')) if t.startswith(('eval/', 'test/'))
              and '/loss_at_position/' not in t}
    assert logged == set(declared)
    # A task with a few answers per example keeps it.
    assert 'eval/seq_accuracy' in evaluate.metric_names(resolve.from_config(tiny_config()))


# -- console ---------------------------------------------------------------------------------


def test_layout_on_one_device_is_one_line():
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
    params = {'w': jnp.zeros((256, 1024), jnp.float32), 'b': jnp.zeros((1024,), jnp.float32)}
    line = sharding.describe_layout(mesh, 'dp', params, {'mu': params, 'nu': params})
    assert '\n' not in line
    assert line == '1 cpu device, nothing sharded: parameters 1.00 MiB, optimizer state 2.01 MiB'


def _finished_run(tmp_path):
    workdir = tmp_path / 'run'
    checkpoint.write_config(str(workdir), tiny_config().to_dict())
    return workdir


def test_refused_workdir_names_the_task_first_and_counts_what_it_lists(tmp_path):
    workdir = _finished_run(tmp_path)
    other = tiny_config(task='copy', model='lstm', model__size='mini')
    total = len([c for c in config_lib.resume_conflicts(json.loads((workdir / 'config.json').read_text()),
                                                        other.to_dict()) if c not in checkpoint.ALSO_RESUMABLE])
    with pytest.raises(UserError) as refused:
        checkpoint.check_workdir(str(workdir), other.to_dict())
    message = str(refused.value)
    assert "holds a run with task.name='recall', not 'copy' (also different: model.name, model.size, " in message
    listed = message.split('(also different: ')[1].split(')')[0]
    named, _, rest = listed.partition(' and ')
    assert rest.endswith(' other fields')
    assert 1 + len(named.split(', ')) + int(rest.split()[0]) == total


def test_refused_workdir_with_one_or_two_other_fields_lists_them_all(tmp_path):
    workdir = _finished_run(tmp_path)
    with pytest.raises(UserError, match=r"model.size='tiny', not 'mini' \(also different: train.seed\);"):
        checkpoint.check_workdir(str(workdir), tiny_config(model__size='mini', train__seed=3).to_dict())


def test_runs_saved_before_the_width_rule_changed_resume_or_say_how(tmp_path):
    """Runs saved when a matched width's default multiple was stored as 8: an LSTM (same
    width) resumes; minGRU at tiny (70 then, 72 now) is refused with the flag that
    continues it, and with that flag it resumes."""
    def run(model: str, overrides=None):
        return resolve.from_config(config_lib.load(f'{ROOT}/configs/recall.py:model={model}', overrides or {}))

    for model, old_width in (('lstm', 80), ('mingru', 70)):
        saved = run(model).config.to_dict()
        saved['model'].update(hidden=old_width, width_multiple=8)
        checkpoint.write_config(str(tmp_path / model), saved)
    lstm = run('lstm')
    assert checkpoint.check_workdir(str(tmp_path / 'lstm'), lstm.config.to_dict(), lstm.derived)
    mingru = run('mingru')
    assert mingru.config.model.hidden == 72 and 'model.hidden' in mingru.derived
    with pytest.raises(UserError, match=r'matched width model\.hidden=70 was chosen by an earlier version of '
                                        r'flaxformer_lite \(this one picks 72\); add --config\.model\.hidden=70 '
                                        r'to continue it'):
        checkpoint.check_workdir(str(tmp_path / 'mingru'), mingru.config.to_dict(), mingru.derived)
    pinned = run('mingru', {'model.hidden': '70'})
    assert checkpoint.check_workdir(str(tmp_path / 'mingru'), pinned.config.to_dict(), pinned.derived)


def test_opening_checkpoints_read_only_logs_no_warning(tmp_path):
    os.makedirs(tmp_path / 'run' / checkpoint.CHECKPOINT_DIR)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    absl_logger = logging.getLogger('absl')
    absl_logger.addHandler(handler)
    try:
        checkpoint.Checkpointer(str(tmp_path / 'run'), max_to_keep=3, async_save=False, read_only=True).close()
        # Only that notice, only there: the same warning logged elsewhere still shows.
        absl_logger.warning('Given directory is read only=%s', 'elsewhere')
    finally:
        absl_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ['Given directory is read only=elsewhere']


def test_a_finished_run_ends_with_what_to_run_next(tmp_path, capsys):
    exp = resolve.from_config(tiny_config(**TINY_RUN))
    loop.train_and_evaluate(exp, str(tmp_path / 'runs' / 't1'), verbose=True)
    lines = capsys.readouterr().err.rstrip('\n').splitlines()
    assert lines[-3:] == [f'next: tensorboard --logdir {tmp_path / "runs"}',
                          f'      python launch.py --eval_only --workdir={tmp_path / "runs" / "t1"}',
                          f'      python launch.py --generate --workdir={tmp_path / "runs" / "t1"} --prompt=TEXT']
    classify = resolve.from_config(tiny_config(task='listops', **{'task.seq_len': 24, 'task.dependency_length': 8}))
    assert loop.next_steps(classify, 'runs/l1').splitlines() == [
        'next: tensorboard --logdir runs', '      python launch.py --eval_only --workdir=runs/l1']
