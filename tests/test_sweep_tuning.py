"""Tuning as a stage of a sweep: the choice per group is made on the validation metric
only, an edge choice is extended by one grid step, mistakes are one clear line, and a
real tuned sweep runs its tuning trials, records the choice and gives it to the main
trials."""

import json
import os
import subprocess
import sys

import pytest

from flaxformer_lite.errors import UserError
from flaxformer_lite.sweep import tuning

from conftest import ROOT, TINY_MODEL, TINY_RECALL, tree_snapshot


def _spec(**kw):
    main = [{'model.name': m, 'train.seed': s} for m in ('transformer', 'lstm') for s in (0, 1)]
    return tuning.tuned(main, {'optim.learning_rate': [1e-3, 3e-3, 1e-2]}, by=('model.name',), **kw)


def _record(eval_loss, test_loss):
    return {'status': 'done', 'metrics': {'eval/loss': eval_loss, 'test/loss': test_loss}}


def test_the_choice_is_made_on_validation_never_on_test():
    spec = _spec()
    # transformer: validation prefers 3e-3, test would prefer 1e-3; lstm: validation prefers 1e-2 (edge)
    losses = {('transformer', 1e-3): (0.50, 0.10), ('transformer', 3e-3): (0.40, 0.90),
              ('transformer', 1e-2): (0.60, 0.95), ('lstm', 1e-3): (0.9, 0.9), ('lstm', 3e-3): (0.8, 0.8),
              ('lstm', 1e-2): (0.7, 0.7)}
    results = [(t, _record(*losses[(t['model.name'], t['optim.learning_rate'])]))
               for t in tuning.tune_trials(spec, {})]
    record = tuning.select(spec, results, {})
    chosen = {g['group']['model.name']: (g['chosen'], g['at_edge']) for g in record['groups']}
    assert chosen == {'transformer': (3e-3, False), 'lstm': (1e-2, True)}
    assert record['metric'] == 'eval/loss'
    # the edge choice gets one geometric grid step beyond it; the interior one none
    assert record['pending_extensions'] == {tuning.group_key({'model.name': 'lstm'}, ('model.name',)): [pytest.approx(
        1e-2 * 1e-2 / 3e-3)]}
    main = tuning.main_trials(spec, record)
    assert [t['optim.learning_rate'] for t in main] == [3e-3, 3e-3, 1e-2, 1e-2]


def test_an_extended_edge_that_stays_at_the_edge_is_flagged_not_extended_again():
    spec = _spec()
    ext = {tuning.group_key({'model.name': m}, ('model.name',)): [0.0333] for m in ('transformer', 'lstm')}
    results = [(t, _record(1.0 / t['optim.learning_rate'], 0.0)) for t in tuning.tune_trials(spec, ext)]
    record = tuning.select(spec, results, ext)
    assert all(g['chosen'] == 0.0333 and g['at_edge'] and g['extended'] == [0.0333] for g in record['groups'])
    assert record['pending_extensions'] == {}


def test_a_choice_made_for_another_tuning_definition_is_one_line_not_a_key_error():
    spec = _spec()
    results = [(t, _record(t['optim.learning_rate'], 0.0)) for t in tuning.tune_trials(spec, {})]
    record = tuning.select(spec, results, {})
    regrouped = tuning.tuned(spec.main, spec.grid, by=('model.name', 'train.seed'))
    with pytest.raises(UserError, match='chosen for another tuning definition') as e:
        tuning.main_trials(regrouped, record)
    assert '\n' not in str(e.value)


def test_tuning_trials_cover_every_group_value_and_seed_at_the_budget():
    spec = _spec(seeds=2, budget={'train.steps': 50})
    trials = tuning.tune_trials(spec, {})
    assert len(trials) == 2 * 3 * 2
    assert all(t['train.steps'] == 50 for t in trials)
    assert {(t['model.name'], t['optim.learning_rate'], t['train.seed']) for t in trials} == {
        (m, lr, s) for m in ('transformer', 'lstm') for lr in (1e-3, 3e-3, 1e-2) for s in (0, 1)}
    # a rerun with other seeds retunes with other seeds
    rerun = tuning.tune_trials(_spec(seeds=2, first_seed=5), {})
    assert sorted({t['train.seed'] for t in rerun}) == [5, 6]


@pytest.mark.parametrize('kw,message', [
    (dict(grid={'optim.learning_rate': [1e-3]}), 'distinct point'),
    (dict(grid={'optim.learning_rat': [1e-3, 1e-2]}), 'optim.learning_rat does not exist'),
    (dict(metric='test/loss'), 'not a validation metric'),
    (dict(by=('model.nam',)), 'by=model.nam is not a config field'),
    (dict(first_seed=-1), 'first_seed=-1'),
    (dict(grid={'optim.learning_rate': [1e-3, 1e-2], 'optim.weight_decay': [0.0, 0.1]}), 'one field per stage'),
])
def test_a_tuning_definition_that_cannot_work_is_one_line(kw, message):
    from flaxformer_lite import config as config_lib
    base = config_lib.base_config('recall')
    grid = kw.pop('grid', {'optim.learning_rate': [1e-3, 1e-2]})
    spec = tuning.tuned([{'model.name': 'lstm'}], grid, by=kw.pop('by', ('model.name',)), **kw)
    from flaxformer_lite.sweep.plan import _has_field
    with pytest.raises(UserError, match=message) as e:
        tuning.check(spec, lambda f: _has_field(base, f))
    assert '\n' not in str(e.value)


def test_the_runner_knows_which_fields_are_inputs_of_the_compiled_step():
    """Trials that differ only in these are not started side by side (the second reads
    what the first compiled), so the list must be the optimizer's own."""
    from flaxformer_lite.sweep import runner
    from flaxformer_lite.train import optimizer
    assert set(runner.DATA_FIELDS) == {'train.seed', *optimizer.STEP_INPUTS.values()}


FIELDS = {**TINY_RECALL, **TINY_MODEL, 'train.steps': 12, 'train.batch_size': 8, 'train.log_every': 6,
          'eval.every_steps': 6, 'eval.num_examples': 16, 'checkpoint.every_steps': 12, 'optim.warmup_steps': 2}
EXPERIMENT = f'''
from flaxformer_lite import sweep
from flaxformer_lite.config import make_config

def get_config(arg=None):
    return make_config(None, task='recall', defaults={FIELDS!r})

def get_sweep(arg=None):
    main = sweep.product({{'model.d_model': [16, 32]}}, sweep.seeds(2))
    grid = [1e-3, 1e-2] if arg != 'bad' else [1e-3]
    return sweep.tuned(main, {{'optim.learning_rate': grid}}, by=('model.d_model',), metric='eval/loss')
'''


def _launch(*args, timeout=600):
    return subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_tuned_sweep_tunes_chooses_on_validation_and_runs_the_main_trials(tmp_path):
    config = tmp_path / 'tuned_experiment.py'
    config.write_text(EXPERIMENT)
    workdir = tmp_path / 'tuned'
    bad = _launch(f'--config={config}:bad', '--sweep', f'--workdir={workdir}')
    assert bad.returncode == 2 and 'distinct point' in bad.stderr and not workdir.exists(), bad.stderr[-2000:]
    dry = _launch(f'--config={config}', '--sweep', f'--workdir={workdir}', '--dry_run')
    assert dry.returncode == 0 and 'tuned.tune: 4 trials' in dry.stdout and 'tuned: 4 trials' in dry.stdout, dry.stdout
    assert not workdir.exists()
    proc = _launch(f'--config={config}', '--sweep', f'--workdir={workdir}', '--parallel=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '2 main trial(s) are tuning trials already run' in proc.stderr, proc.stderr[-3000:]
    record = json.loads((workdir / 'tuning.json').read_text())
    assert record['metric'] == 'eval/loss' and record['field'] == 'optim.learning_rate'
    tune_dirs = [d for d in os.listdir(workdir / 'tune') if d[:4].isdigit()]
    assert len(tune_dirs) >= 4  # 2 groups x 2 rates, plus any one-step extension of an edge choice
    for group in record['groups']:
        width = group['group']['model.d_model']
        # the choice is the best mean eval/loss of the group's tuning trials
        runs = []
        for d in tune_dirs:
            result = json.loads((workdir / 'tune' / d / 'results.json').read_text())
            if result['config']['model.d_model'] == width:
                runs.append((result['metrics']['eval/loss'], result['config']['optim.learning_rate']))
        assert group['chosen'] == min(runs)[1]
        mains = [json.loads((workdir / d / 'results.json').read_text()) for d in os.listdir(workdir)
                 if d[:4].isdigit()]
        mine = [m for m in mains if m['config']['model.d_model'] == width]
        assert len(mine) == 2 and all(m['config']['optim.learning_rate'] == group['chosen'] for m in mine)
        # the seed-0 main trial repeats a tuning trial exactly: copied, not trained again
        reused = [m for m in mine if m.get('reused_from')]
        assert [m['config']['train.seed'] for m in reused] == [0]
        original = json.loads((workdir / reused[0]['reused_from'] / 'results.json').read_text())
        assert original['metrics'] == reused[0]['metrics'] and original['workdir'] != reused[0]['workdir']
    before = tree_snapshot(workdir)
    again = _launch(f'--config={config}', '--sweep', f'--workdir={workdir}')
    assert again.returncode == 0 and '4 done, 0 to run' in again.stderr, again.stderr[-2000:]
    assert {k: v for k, v in tree_snapshot(workdir).items() if 'logs' not in k and 'lock' not in k
            and 'jax_cache' not in k and 'tuning.json' not in k and 'sweep.json' not in k} == {
        k: v for k, v in before.items() if 'logs' not in k and 'lock' not in k and 'jax_cache' not in k
        and 'tuning.json' not in k and 'sweep.json' not in k}
    report = _launch('--report', f'--workdir={workdir}')
    assert report.returncode == 0, report.stderr[-2000:]
    assert (workdir / 'report' / 'tuning_curves.png').is_file()
    assert 'optim.learning_rate chosen per group on eval/loss' in (workdir / 'report' / 'report.md').read_text()
