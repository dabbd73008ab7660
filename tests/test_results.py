"""What a run leaves behind for sweeps and reports: results.json with test metrics,
`--eval_only` reproducing them, evaluation settings that never change the model, the
HParams declaration, throughput timed over training steps only, and a loop that
closes its files whatever ends it."""

import json
import os

import pytest

from flaxformer_lite import cli, resolve
from flaxformer_lite.errors import ConfigError, UserError
from flaxformer_lite.train import loop, results, train_and_evaluate
from flaxformer_lite.train.evaluate import Evaluator

from conftest import event_history, read_scalars, tiny_config

SHORT = dict(train__steps=20, eval__every_steps=10, checkpoint__every_steps=10)


def _train(cfg, workdir, **kwargs):
    return train_and_evaluate(resolve.from_config(cfg), workdir, verbose=False, **kwargs)


def test_results_json_records_the_run_with_test_metrics(workdir):
    cfg = tiny_config(**SHORT, eval__dependency_lengths=(5,))
    _train(cfg, workdir)
    r = json.load(open(os.path.join(workdir, 'results.json')))
    assert r['status'] == 'done' and r['step'] == 20 and r['name'] == 'run' and r['family'] == 'transformer'
    for prefix in ('eval', 'eval/dep_5', 'test', 'test/dep_5'):
        assert {f'{prefix}/loss', f'{prefix}/accuracy', f'{prefix}/seq_accuracy'} <= set(r['metrics'])
    scalars = read_scalars(workdir)
    assert scalars['test/accuracy'] == {20: r['metrics']['test/accuracy']}  # logged once, at the end
    assert r['metrics']['eval/accuracy'] == scalars['eval/accuracy'][20]
    assert r['best']['eval/loss']['value'] == min(scalars['eval/loss'].values())
    exp = resolve.from_config(cfg)
    tokens = 20 * 16 * exp.tokens_per_example()
    assert r['tokens'] == tokens and r['train_flops'] == pytest.approx(tokens * r['flops_per_token'])
    assert r['params_total'] == r['params_embedding'] + r['params_non_embedding'] > 0
    assert r['config']['model.d_model'] == 32 and r['config']['eval.dependency_lengths'] == [5]
    assert r['wall_s'] >= r['train_s'] > 0 and r['steps_per_s'] > 0
    assert r['code_version'] is None or len(r['code_version']) >= 7


def test_eval_only_reproduces_the_test_metrics_exactly(workdir, capsys):
    _train(tiny_config(**SHORT), workdir)
    before = json.load(open(os.path.join(workdir, 'results.json')))
    files = sorted(os.listdir(workdir))
    assert cli.main(['--eval_only', f'--workdir={workdir}', '--config.eval.dependency_lengths=(6,)']) == 0
    assert 'test/dep_6/accuracy' in capsys.readouterr().out
    after = json.load(open(os.path.join(workdir, 'results.json')))
    for name, value in before['metrics'].items():
        assert after['metrics'][name] == value, name  # bit for bit
    assert 'test/dep_6/accuracy' in after['metrics'] and sorted(os.listdir(workdir)) == files
    assert after['convergence'] == before['convergence']


def test_results_json_says_whether_the_validation_loss_had_converged(workdir, capsys):
    _train(tiny_config(train__steps=20, eval__every_steps=2, checkpoint__every_steps=10), workdir)
    path = os.path.join(workdir, 'results.json')
    verdict = json.load(open(path))['convergence']
    assert verdict == results.convergence(event_history(workdir)['eval/loss'], 20)  # the curve TensorBoard shows
    assert verdict['metric'] == 'eval/loss' and verdict['points'] == 3 and verdict['window'] == [16, 20]
    assert verdict['status'] in ('converged', 'still_improving') and verdict['rule'] == results.CONVERGENCE_RULE
    os.remove(path)  # --eval_only writes the record again, the verdict with it
    assert cli.main(['--eval_only', f'--workdir={workdir}']) == 0
    assert json.load(open(path))['convergence'] == verdict


def test_eval_only_on_a_workdir_without_a_checkpoint_is_one_line(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert cli.main(['--eval_only', f'--workdir={empty}']) == 2
    assert 'holds no run' in capsys.readouterr().err
    assert os.listdir(empty) == []


def test_adding_evaluation_lengths_on_resume_keeps_the_model(workdir):
    _train(tiny_config(**{**SHORT, 'train__steps': 10}), workdir)
    result = _train(tiny_config(**SHORT, eval__dependency_lengths=(4, 8)), workdir)
    assert result['status'] == 'done' and 'test/dep_8/accuracy' in result
    saved = json.load(open(os.path.join(workdir, 'config.json')))
    assert saved['model']['max_len'] == 16  # the training task's length, not the longest evaluated one


def test_learned_positions_cannot_be_evaluated_beyond_max_len():
    with pytest.raises(ConfigError, match="model.pos_encoding='learned' has no positions beyond model.max_len=16"):
        resolve.from_config(tiny_config(model__pos_encoding='learned', eval__dependency_lengths=(20,)))
    resolve.from_config(tiny_config(model__pos_encoding='sinusoidal', eval__dependency_lengths=(20,)))


def test_mismatched_workdir_names_the_field_the_user_changed_first(workdir):
    _train(tiny_config(train__steps=5, eval__every_steps=5, checkpoint__every_steps=5), workdir)
    cfg = tiny_config(model='lstm', train__steps=5)
    with pytest.raises(UserError, match=r"holds a run with model.name='transformer', not 'lstm'"):
        _train(cfg, workdir)


def test_hparams_declare_exactly_the_metrics_the_run_logs(workdir):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    _train(tiny_config(task='listops', **SHORT, **{'task.seq_len': 24, 'task.dependency_length': 8}), workdir)
    acc = EventAccumulator(workdir)
    acc.Reload()
    content = acc.PluginTagToContent('hparams')
    declared = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment']).experiment
    metrics = {m.name.tag for m in declared.metric_infos}
    logged = set(read_scalars(workdir))
    assert metrics <= logged and metrics == {'eval/loss', 'eval/accuracy', 'test/loss', 'test/accuracy', 'train/loss'}
    first = [h.display_name for h in declared.hparam_infos if h.differs]
    assert first == ['model.name', 'model.size', 'task.name']
    session = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info'])
    assert session.session_start_info.group_name == 'run'  # the workdir's name, not a hash


class _Recording(loop.StepTimer):
    events: list = []

    def start(self):
        super().start()
        self.events.append('start')

    def stop(self, *pending):
        super().stop(*pending)
        self.events.append('stop')


def test_throughput_is_timed_over_training_steps_only(workdir, monkeypatch):
    """The timer is stopped whenever the loop evaluates or saves (and during the first,
    compiling step), so neither counts in train/tokens_per_sec."""
    events = _Recording.events = []
    monkeypatch.setattr(loop, 'StepTimer', _Recording)
    evaluate = Evaluator.__call__
    monkeypatch.setattr(Evaluator, '__call__', lambda self, *a, **k: (events.append('eval'), evaluate(self, *a, **k))[1])
    save = loop.checkpoint.Checkpointer.save
    monkeypatch.setattr(loop.checkpoint.Checkpointer, 'save', lambda self, *a: (events.append('save'), save(self, *a))[1])
    _train(tiny_config(**SHORT), workdir)
    running = False
    for event in events:
        running = {'start': True, 'stop': False}.get(event, running)
        assert not (running and event in ('eval', 'save')), events
    assert events.count('eval') == 3 and events.count('save') == 2  # eval at 10, 20 and the test split
    assert set(read_scalars(workdir)['train/tokens_per_sec']) == {5, 10, 15, 20}  # steps 2-5 timed, then 6-10, ...


def test_step_timer_counts_only_running_time():
    clock = iter([0.0, 1.0, 11.0, 12.0]).__next__
    timer = loop.StepTimer()
    loop.time.perf_counter, real = clock, loop.time.perf_counter
    try:
        timer.start()
        for _ in range(10):
            timer.count()
        timer.stop()  # 1 s of steps, then 10 s of evaluation
        timer.count()  # dispatched while stopped: not counted
        timer.start()
        for _ in range(10):
            timer.count()
        timer.stop()
    finally:
        loop.time.perf_counter = real
    assert timer.window_rate() == 10.0 and timer.steps == 20 and timer.seconds == 2.0


def test_a_paused_step_timer_runs_again_only_if_it_ran():
    timer = loop.StepTimer()
    with timer.paused():
        timer.count()
    assert timer.steps == 0  # it was not running, and is not after the pause
    timer.start()
    with timer.paused():
        timer.count()  # dispatched while paused: not counted
    timer.count()
    assert timer.steps == 1


def test_an_exception_in_the_loop_still_finishes_checkpoints_and_closes_events(workdir, monkeypatch):
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('boom')
        return evaluate(self, *args, **kwargs)

    evaluate = Evaluator.__call__
    monkeypatch.setattr(Evaluator, '__call__', failing)
    with pytest.raises(RuntimeError, match='boom'):
        _train(tiny_config(**SHORT, checkpoint__async_save=True), workdir)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']  # complete, no *-tmp folder
    assert 10 in read_scalars(workdir)['eval/accuracy']
    assert not os.path.exists(os.path.join(workdir, 'results.json'))
