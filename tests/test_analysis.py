"""analysis: fits recover known laws from generated points (truth inside the intervals),
unsupported fits say why, seed aggregation by hand, and a report written from a fake sweep
(tables, PNGs, TensorBoard images, failed and pending trials) without importing jax."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxformer_lite import analysis
from flaxformer_lite.analysis import tables
from flaxformer_lite.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


# --- fits -------------------------------------------------------------------------------

def test_power_law_recovers_known_law_inside_its_intervals():
    E, A, alpha = 1.7, 400.0, 0.34
    n = np.geomspace(1e5, 3e8, 8)
    loss = (E + A * n ** -alpha) * (1 + 0.01 * np.random.default_rng(0).standard_normal(8))
    fit = analysis.fit_power_law(n, loss, n_boot=200, seed=0)
    assert fit.ok and fit.n_points == 8
    for name, truth in (('E', E), ('A', A), ('alpha', alpha)):
        lo, hi = fit.intervals[name]
        assert lo < truth < hi, (name, lo, truth, hi)
        assert lo <= fit.params[name] <= hi
    assert abs(fit.params['alpha'] - alpha) < 0.02
    assert abs(fit.params['E'] - E) / E < 0.05
    assert abs(fit.params['A'] - A) / A < 0.2
    band = fit.band(n)
    assert np.all(band[0] <= band[1]) and np.all(band[0] < fit.predict(n) * 1.01)
    assert fit.to_dict()['intervals']['alpha'] == list(fit.intervals['alpha'])


def test_power_law_intervals_repeat_with_the_seed_and_change_without():
    n = np.geomspace(1e4, 1e7, 6)
    loss = (2.0 + 50 * n ** -0.3) * (1 + 0.02 * np.random.default_rng(3).standard_normal(6))
    a, b = (analysis.fit_power_law(n, loss, n_boot=60, seed=1) for _ in range(2))
    c = analysis.fit_power_law(n, loss, n_boot=60, seed=2)
    assert a.intervals == b.intervals and a.intervals != c.intervals


def test_unsupported_power_laws_are_not_fitted_with_the_reason():
    n = np.array([1e5, 1e6, 1e7])
    fit = analysis.fit_power_law(n, 2 + 10 * n ** -0.3)
    assert not fit.ok and fit.reason == 'not fitted: 3 points, need at least 4'
    assert not fit.params and 'params' not in fit.to_dict()
    seeds = analysis.fit_power_law(np.repeat(n[:2], 3), np.linspace(3, 2, 6))
    assert seeds.reason == 'not fitted: 6 points at 2 distinct values, need at least 4'
    rising = np.geomspace(1e5, 1e8, 6)
    up = analysis.fit_power_law(rising, 1 + 0.1 * np.log(rising), n_boot=20)
    assert not up.ok and 'does not fall' in up.reason


def test_pareto_frontier_keeps_the_lowest_loss_at_or_below_each_compute():
    c = [1, 2, 2, 3, 4, 5]
    loss = [5.0, 4.0, 6.0, 4.5, 3.0, 3.0]
    assert list(analysis.pareto_frontier(c, loss)) == [0, 1, 4]


def _isoflop_profiles(budgets, rng, noise=0.003):
    E, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28
    g = ((alpha * A) / (beta * B)) ** (1 / (alpha + beta))
    out = {}
    for c in budgets:
        n = g * (c / 6) ** (beta / (alpha + beta)) * np.geomspace(0.2, 6, 7)  # around the optimum
        d = c / (6 * n)
        out[c] = (n, (E + A * n ** -alpha + B * d ** -beta) * (1 + noise * rng.standard_normal(len(n))))
    return out, beta / (alpha + beta)


def test_isoflop_recovers_the_optimal_size_exponent():
    profiles, exponent = _isoflop_profiles(np.geomspace(1e16, 1e19, 5), np.random.default_rng(0))
    fit = analysis.fit_isoflop(profiles, n_boot=200, seed=0)
    assert all(p.ok for p in fit.parabolas)
    law = fit.law
    assert law.ok and law.n_points == 5
    assert abs(law.params['a'] - exponent) < 0.02
    lo, hi = law.intervals['a']
    assert lo < exponent < hi and hi - lo < 0.1
    for p in fit.parabolas:  # each minimum lies inside its samples and below them
        n, loss = profiles[p.budget]
        assert n.min() < p.n_star < n.max() and p.loss_star <= loss.min() * 1.005


def test_isoflop_with_two_budgets_has_no_law():
    profiles, _ = _isoflop_profiles([1e16, 1e17], np.random.default_rng(1))
    law = analysis.fit_isoflop(profiles, n_boot=20).law
    assert not law.ok and law.reason == 'not fitted: 2 budgets with a minimum, need at least 3'


def test_parabola_without_a_usable_minimum_gives_no_n_star():
    n = np.geomspace(1e5, 1e7, 5)
    concave = analysis.fit_parabola(n, 3 - 0.05 * (np.log(n) - np.log(1e6)) ** 2, budget=1e15)
    assert not concave.ok and math.isnan(concave.n_star) and 'not convex' in concave.reason
    far = analysis.fit_parabola(n, 2 + 0.01 * (np.log(n) - np.log(1e10)) ** 2, budget=1e15)
    assert not far.ok and math.isnan(far.n_star) and 'outside the sampled range' in far.reason
    few = analysis.fit_parabola(n[:3], [3.0, 2.0, 3.0], budget=1e15)
    assert not few.ok and few.reason.startswith('not fitted: 3 points')


# --- tables -----------------------------------------------------------------------------

def _run(family, seed, status='done', **metrics):
    return analysis.Run(name=f'{family}-{seed}', status=status, workdir=f'/w/{family}-{seed}', sweep='s',
                        swept_fields=('model.name', 'train.seed'),
                        config={'model.name': family, 'train.seed': seed},
                        record={'status': status, 'metrics': metrics, 'params_non_embedding': 1000})


def test_seed_aggregation_by_hand():
    runs = [_run('lstm', 0, **{'test/accuracy': 0.5, 'test/loss': 2.0}),
            _run('lstm', 1, **{'test/accuracy': 0.7, 'test/loss': 1.0}),
            _run('lstm', 2, **{'test/accuracy': 0.9}),
            _run('lstm', 3, status='failed', **{'test/accuracy': 0.0}),
            _run('gru', 0, **{'test/accuracy': 0.25})]
    by = tables.group_fields(runs)
    assert by == ['model.name']  # the seed is aggregated over
    groups = {g.values['model.name']: g for g in analysis.aggregate(runs, by)}
    acc = groups['lstm'].stats['test/accuracy']
    assert acc['n'] == 3 and acc['mean'] == pytest.approx(0.7) and acc['std'] == pytest.approx(0.2)
    assert (acc['min'], acc['max']) == (0.5, 0.9)
    loss = groups['lstm'].stats['test/loss']
    assert loss['n'] == 2 and loss['std'] == pytest.approx(math.sqrt(0.5))
    single = groups['gru'].stats['test/accuracy']
    assert single == dict(mean=0.25, std=0.0, min=0.25, max=0.25, n=1)
    assert len(groups['lstm'].runs) == 3  # the failed run is not averaged
    md = tables.groups_markdown(list(groups.values()), by, ['test/accuracy', 'test/loss'])
    assert '| lstm | 3 | unknown | 0.7 ± 0.2 | 1.5 ± 0.71 (n=2) | 1k |' in md  # no convergence recorded


def _tuned(family, lr, seed, acc, loss):
    run = _run(family, seed, **{'eval/accuracy': acc, 'eval/loss': loss})
    run.config['optim.learning_rate'] = lr
    return run


def test_choose_takes_the_best_mean_then_the_tie_breaker():
    from flaxformer_lite.analysis import report
    runs = [_tuned('lstm', 1e-3, 0, 0.5, 1.0), _tuned('lstm', 1e-3, 1, 0.7, 1.0),  # mean 0.6
            _tuned('lstm', 1e-2, 0, 0.9, 0.5), _tuned('lstm', 1e-2, 1, 0.1, 0.5),  # mean 0.5
            _tuned('gru', 1e-3, 0, 1.0, 0.2), _tuned('gru', 1e-2, 0, 1.0, 0.1)]    # tie: lower loss wins
    rows = {r['model.name']: r for r in report.choose(runs, 'optim.learning_rate', 'eval/accuracy', ['model.name'],
                                                      tie='eval/loss')}
    assert rows['lstm']['optim.learning_rate'] == 1e-3 and rows['lstm']['eval/accuracy'] == pytest.approx(0.6)
    assert rows['gru']['optim.learning_rate'] == 1e-2 and rows['gru']['eval/loss'] == pytest.approx(0.1)
    by_loss = report.choose(runs, 'optim.learning_rate', 'eval/loss', ['model.name'])
    assert {r['model.name']: r['optim.learning_rate'] for r in by_loss} == {'lstm': 1e-2, 'gru': 1e-2}


def test_number_formatting_is_short_and_stable():
    assert [tables.fmt(v, k) for v, k in [(812345, 'params_non_embedding'), (4.7e6, 'params_total'),
                                          (1.5e13, 'train_flops'), (0.123456, 'test/loss'), (64, 'x'),
                                          (1e-3, 'optim.learning_rate'), (None, 'x'), (120.46, 'wall_s')]] \
        == ['812k', '4.7M', '1.5e+13', '0.1235', '64', '0.001', '', '120.5']


# --- report -----------------------------------------------------------------------------

SIZES = {'tiny': 1e5, 'mini': 8e5, 'small': 4.7e6, 'medium': 2.5e7}
LAWS = {'transformer': (1.7, 400.0, 0.34), 'lstm': (1.9, 300.0, 0.30)}


def _results(family, size, dep, seed, rng):
    E, A, alpha = LAWS[family]
    n = SIZES[size] * (1.0 if family == 'transformer' else 1.05)
    loss = (E + A * n ** -alpha) * (1 + 0.01 * rng.standard_normal())
    acc = float(np.clip(0.95 - (0.1 if family == 'transformer' else 0.2) * np.log2(dep / 16)
                        + 0.02 * rng.standard_normal(), 0, 1))
    metrics = {'eval/loss': loss * 1.01, 'eval/accuracy': acc, 'test/loss': loss, 'test/accuracy': acc}
    metrics.update({f'test/dep_{d}/accuracy': acc * min(1.0, dep / d) for d in (16, 64, 256)})
    config = {'model.name': family, 'model.size': size, 'task.name': 'mqar', 'task.dependency_length': dep,
              'train.seed': seed, 'train.steps': 100}
    return {'status': 'done', 'family': family, 'task': 'mqar', 'kind': 'lm', 'config': config,
            'metrics': metrics, 'best': {'eval/accuracy': {'value': acc + 0.01, 'step': 50}},
            'chance': {'accuracy': 0.0625}, 'curves': {'test/loss_by_position': list(3.0 / np.arange(1, 33) ** 0.2)},
            'history': {'eval/accuracy': [[50, acc / 2], [100, acc]], 'eval/loss': [[50, 2 * loss], [100, loss]]},
            'step': 100, 'wall_s': 10.0 + seed, 'params_total': n + 2048, 'params_non_embedding': n,
            'tokens': 64 * 3200, 'train_flops': 6 * n * 64 * 3200, 'code_version': 'abc1234'}


def make_sweep(root, families=('transformer', 'lstm'), sizes=tuple(SIZES), deps=(16, 64), seeds=(0, 1)):
    """A sweep workdir: every trial done, except the last failed and one pending."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    trials = []
    for family in families:
        for size in sizes:
            for dep in deps:
                for seed in seeds:
                    over = {'model.name': family, 'model.size': size, 'task.dependency_length': dep,
                            'train.seed': seed}
                    name = ','.join(f'{k}={v}' for k, v in over.items())
                    trials.append(dict(index=len(trials), name=name, dir=f'trial_{len(trials):04d}', overrides=over))
    for i, trial in enumerate(trials):
        if i == 1:
            continue  # pending: listed, no workdir yet
        os.makedirs(os.path.join(root, trial['dir']))
        o = trial['overrides']
        record = _results(o['model.name'], o['model.size'], o['task.dependency_length'], o['train.seed'], rng)
        if i == len(trials) - 1:
            record = {'status': 'failed', 'name': trial['name'], 'config': record['config'], 'exit_code': 1,
                      'error': 'RuntimeError: out of memory'}
        record.update(name=trial['name'], workdir=os.path.join(root, trial['dir']))
        with open(os.path.join(root, trial['dir'], 'results.json'), 'w') as f:
            json.dump(record, f)
    with open(os.path.join(root, 'sweep.json'), 'w') as f:
        json.dump({'config': 'experiments/long_range.py:quick',
                   'swept_fields': ['model.name', 'model.size', 'task.dependency_length', 'train.seed'],
                   'trials': trials}, f)
    return trials


def test_load_runs_marks_pending_and_failed_and_keeps_sweeps_apart(tmp_path):
    make_sweep(str(tmp_path / 'a' / 'sw'), sizes=('tiny', 'mini'), deps=(16,))
    make_sweep(str(tmp_path / 'b' / 'sw'), families=('lstm',), sizes=('tiny',), deps=(16,), seeds=(0, 1, 2))
    runs = analysis.load_runs([str(tmp_path)])
    assert len(runs) == 8 + 3
    assert {r.sweep for r in runs} == {'a/sw', 'b/sw'}
    assert [r.status for r in runs if r.sweep == 'a/sw'].count('pending') == 1
    failed = [r for r in runs if r.status == 'failed']
    assert len(failed) == 2 and failed[0].error == 'RuntimeError: out of memory'
    pending = next(r for r in runs if r.status == 'pending')
    assert pending.config['model.size'] == 'tiny' and pending.family == 'transformer'
    single = analysis.load_runs([os.path.join(str(tmp_path / 'a' / 'sw'), 'trial_0000')])
    assert len(single) == 1 and single[0].sweep is None and single[0].status == 'done'
    assert tables.table_fields(runs)[0] == 'sweep'


def test_single_runs_are_told_apart_by_their_config_not_bookkeeping(tmp_path):
    root = str(tmp_path / 'runs')
    make_sweep(root, families=('lstm',), deps=(16,))
    os.remove(os.path.join(root, 'sweep.json'))  # now a folder of separately launched runs
    for i, d in enumerate(sorted(os.listdir(root))):
        path = os.path.join(root, d, 'results.json')
        record = json.load(open(path))
        record['config'].update({'eval.every_steps': 10 * i, 'checkpoint.every_steps': i})
        json.dump(record, open(path, 'w'))
    runs = analysis.load_runs([root])
    assert len(runs) == 7 and all(r.sweep is None for r in runs)
    assert tables.table_fields(runs) == ['model.size', 'train.seed']
    (fit,) = analysis.analyse(runs, 'test/loss', n_boot=20)
    assert fit.context == {} and fit.params_fit.ok and fit.params_fit.n_points == 6


def test_folder_without_runs_raises_one_line_user_error(tmp_path):
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    with pytest.raises(UserError) as e:
        analysis.write_report([str(tmp_path / 'empty')], str(tmp_path / 'out'))
    message = str(e.value)
    assert '\n' not in message and str(tmp_path / 'empty') in message and 'holds no runs' in message
    assert not (tmp_path / 'out').exists()
    with pytest.raises(UserError, match='unknown plot'):
        make_sweep(str(tmp_path / 'sw'), sizes=('tiny',), deps=(16,))
        analysis.write_report([str(tmp_path / 'sw')], str(tmp_path / 'out'), {'plots': ['pie']})


def test_write_report_on_a_fake_sweep(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    sweep = str(tmp_path / 'sweep')
    trials = make_sweep(sweep)
    out_dir = str(tmp_path / 'report')
    out = analysis.write_report([sweep], out_dir, {'bootstrap': 40})
    paths, summary = out['paths'], out['summary']
    assert summary['runs'] == {'done': len(trials) - 2, 'failed': 1, 'pending': 1}
    for key in ('report_md', 'results_csv', 'results_json', 'results_md', 'aggregated_csv'):
        assert os.path.getsize(paths[key]) > 0
    expected = {'loss_vs_params', 'loss_vs_compute', 'accuracy_vs_dependency_length', 'length_generalization',
                'loss_by_position', 'learning_curves'}
    assert set(paths['plots']) == expected
    for png in paths['plots'].values():
        with open(png, 'rb') as f:
            data = f.read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert set(summary['skipped']) == {'isoflop', 'optimal_params'}

    report = open(paths['report_md']).read()
    for name in paths['plots']:
        assert f']({name}.png)' in report
    assert trials[-1]['name'] in report and 'RuntimeError: out of memory' in report
    assert trials[1]['name'] in report and 'pending' in report
    assert 'transformer, dependency_length=16: L(N) = ' in report
    assert 'alpha 95% CI [' in report and 'from 8 points' in report
    assert 'isoflop' in report and 'three or more sizes' in report

    with open(paths['results_csv']) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(trials) and list(rows[0])[:5] == [
        'model.name', 'model.size', 'task.dependency_length', 'train.seed', 'status']
    saved = json.load(open(paths['results_json']))
    groups = saved['aggregated']
    assert len(groups) == 2 * 4 * 2 and all(set(g['group']) == {'model.name', 'model.size',
                                                                  'task.dependency_length'} for g in groups)
    fits = {(f['family'], f['context']['task.dependency_length']): f for f in summary['fits']}
    assert len(fits) == 4
    law = fits[('transformer', 64)]['loss_vs_params']
    assert law['ok'] and law['n_points'] == 8 and abs(law['params']['alpha'] - 0.34) < 0.05

    acc = EventAccumulator(out_dir, size_guidance={'tensors': 0})
    acc.Reload()
    assert {f'report/{name}' for name in expected} | {'report/summary'} <= set(acc.Tags()['tensors'])
    # The report's own results.json is not mistaken for a run when the parent is read again.
    assert len(analysis.load_runs([str(tmp_path)])) == len(trials)


def make_isoflop_sweep(root):
    """Runs at 4 compute budgets (recorded as train.flops_budget), sizes around each optimum,
    with the loss of Hoffmann et al.'s parametric law; returns the true N* exponent."""
    E, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28
    g = ((alpha * A) / (beta * B)) ** (1 / (alpha + beta))
    sizes = np.geomspace(1e5, 1e9, 17)
    rng, eval_rng = np.random.default_rng(0), np.random.default_rng(1)
    os.makedirs(root)
    trials = []
    for family, shift in (('transformer', 1.0), ('lstm', 1.1)):
        for budget in np.geomspace(1e15, 1e18, 4):
            n_opt = g * (budget / 6) ** (beta / (alpha + beta))
            for i, n in enumerate(sizes[(sizes > n_opt / 8) & (sizes < n_opt * 8)]):
                tokens = budget / (6 * n)
                loss = shift * (E + A * n ** -alpha + B * tokens ** -beta) * (1 + 0.002 * rng.standard_normal())
                over = {'model.name': family, 'train.flops_budget': float(budget), 'model.d_model': i}
                trial = dict(index=len(trials), name=f'{family}-{budget:.0e}-{i}', dir=f't{len(trials)}',
                             overrides=over)
                trials.append(trial)
                os.makedirs(os.path.join(root, trial['dir']))
                record = {'status': 'done', 'name': trial['name'], 'kind': 'lm', 'config': dict(over),
                          'metrics': {'test/loss': loss, 'eval/loss': loss * (1 + 0.002 * eval_rng.standard_normal())},
                          'params_non_embedding': n,
                          'train_flops': budget * (1 + 0.01 * rng.standard_normal()), 'tokens': tokens}
                with open(os.path.join(root, trial['dir'], 'results.json'), 'w') as f:
                    json.dump(record, f)
    with open(os.path.join(root, 'sweep.json'), 'w') as f:
        json.dump({'swept_fields': ['model.name', 'train.flops_budget', 'model.d_model'], 'trials': trials}, f)
    return beta / (alpha + beta)


def test_write_report_on_an_isoflop_sweep(tmp_path):
    exponent = make_isoflop_sweep(str(tmp_path / 'iso'))
    out = analysis.write_report([str(tmp_path / 'iso')], str(tmp_path / 'report'), {'bootstrap': 40})
    assert {'isoflop', 'optimal_params', 'loss_vs_params', 'loss_vs_compute'} <= set(out['paths']['plots'])
    for fit in out['summary']['fits']:
        law = fit['isoflop']['law']
        assert law['ok'] and law['n_points'] == 4 and abs(law['params']['a'] - exponent) < 0.03
        assert all(p['ok'] for p in fit['isoflop']['parabolas'])
        assert 'at each size the training length (train.flops_budget) with the lowest eval/loss' in fit['notes'][0]
    report = open(out['paths']['report_md']).read()
    assert 'transformer: N*(C) = ' in report and 'from 4 of 4 budgets' in report


def test_too_few_sizes_are_reported_not_fitted(tmp_path):
    sweep = str(tmp_path / 'sweep')
    make_sweep(sweep, deps=(16,), seeds=(0,))  # one pending, one failed: 3 sizes left per family
    out = analysis.write_report([sweep], str(tmp_path / 'report'), {'plots': ['scaling'], 'bootstrap': 10})
    fits = {f['family']: f['loss_vs_params'] for f in out['summary']['fits']}
    assert all(f['context'] == {} for f in out['summary']['fits'])  # one dependency length: no setting
    assert fits['transformer'] == {'law': 'power_law', 'ok': False, 'n_points': 3,
                                   'reason': 'not fitted: 3 points, need at least 4'}
    assert fits['lstm']['reason'] == 'not fitted: 3 points, need at least 4'
    report = open(out['paths']['report_md']).read()
    assert 'lstm: L(N) not fitted: 3 points, need at least 4' in report
    assert set(out['paths']['plots']) == {'loss_vs_params', 'loss_vs_compute'}


def test_analysis_imports_no_jax_models_or_train(tmp_path):
    sweep = str(tmp_path / 'sweep')
    make_sweep(sweep, sizes=('tiny', 'mini'), deps=(16, 64), seeds=(0,))
    code = ('import sys; from flaxformer_lite import analysis; '
            'analysis.write_report([sys.argv[1]], sys.argv[2], {"bootstrap": 5}); '
            'bad = [m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax") '
            'or m.startswith(("flaxformer_lite.models", "flaxformer_lite.train", "flaxformer_lite.resolve"))]; '
            'assert not bad, bad')
    result = subprocess.run([sys.executable, '-c', code, sweep, str(tmp_path / 'report')], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / 'report' / 'report.md')


def test_table_metrics_choose_the_summary_columns(tmp_path):
    sweep = str(tmp_path / 'sweep')
    make_sweep(sweep, sizes=('tiny',), deps=(16,))
    default = analysis.write_report([sweep], str(tmp_path / 'a'), {'plots': [], 'fits': False})
    chosen = analysis.write_report([sweep], str(tmp_path / 'b'), {'plots': [], 'fits': False,
                                                                 'table_metrics': ['test/loss']})
    header = lambda out: next(line for line in open(out['paths']['report_md']) if line.startswith('| model.name'))
    assert 'test/accuracy' in header(default) and 'test/loss' in header(default)
    assert 'test/loss' in header(chosen) and 'test/accuracy' not in header(chosen)


def test_a_field_set_by_the_x_axis_does_not_split_the_lines():
    from flaxformer_lite.analysis.plots_metrics import _line_fields
    from flaxformer_lite.analysis.runs import Run
    swept = ('model.name', 'task.dependency_length', 'task.seq_len', 'task.num_pairs')
    runs = [Run(name=f'{m}{d}{p}', status='done', workdir='.', sweep='s', sweep_dir='s', swept_fields=swept,
                config={'model.name': m, 'task.dependency_length': d, 'task.seq_len': d + 16, 'task.num_pairs': p})
            for m in ('transformer', 'lstm') for d in (16, 64) for p in (2, 4)]
    # seq_len follows the dependency length (one line per family and num_pairs); num_pairs does not
    assert _line_fields(runs, ['model.name'], ['task.dependency_length']) == ['model.name', 'task.num_pairs']
    assert _line_fields(runs, ['model.name'], []) == ['model.name', 'task.dependency_length', 'task.seq_len',
                                                     'task.num_pairs']


# --- reproduction across sweeps -----------------------------------------------------------

def test_rerun_interval_by_hand():
    t975 = {1: 12.706205, 2: 4.302653}  # Student t quantiles, df 1 and 2
    lo, hi = tables.rerun_interval({'mean': 0.5, 'std': 0.1, 'n': 3}, 'test/accuracy')
    assert (lo, hi) == pytest.approx((0.5 - t975[2] * 0.1 * math.sqrt(2 / 3), 0.5 + t975[2] * 0.1 * math.sqrt(2 / 3)))
    lo, hi = tables.rerun_interval({'mean': 0.5, 'std': 0.1, 'n': 3}, 'test/loss', m=6)
    assert hi - 0.5 == pytest.approx(t975[2] * 0.1 * math.sqrt(1 / 3 + 1 / 6))
    # accuracies are clipped to [0, 1], losses to [0, inf); other metrics are not
    assert tables.rerun_interval({'mean': 0.95, 'std': 0.02, 'n': 2}, 'eval/seq_accuracy') == \
        pytest.approx((0.95 - t975[1] * 0.02, 1.0))
    assert tables.rerun_interval({'mean': 0.1, 'std': 0.2, 'n': 2}, 'test/loss')[0] == 0.0
    assert tables.rerun_interval({'mean': 0.1, 'std': 0.2, 'n': 2}, 'test/log_ratio')[0] < 0
    assert tables.rerun_interval({'mean': 1.0, 'std': 0.0, 'n': 3}, 'test/accuracy') == (1.0, 1.0)
    assert tables.rerun_interval({'mean': 0.3, 'std': 0.0, 'n': 1}, 'test/accuracy') is None


def _seeded(sweep, family, seed, acc):
    from flaxformer_lite.analysis.runs import Run
    return Run(name=f'{family}{seed}', status='done', workdir='.', sweep=sweep, sweep_dir=sweep,
               swept_fields=('model.name', 'train.seed'), config={'model.name': family, 'train.seed': seed},
               record={'metrics': {'test/accuracy': acc}})


def test_compare_checks_each_sweep_against_the_others_interval():
    from flaxformer_lite.analysis import reproduce
    runs = ([_seeded('a', 'gru', s, acc) for s, acc in enumerate((0.99, 0.98, 0.97))]
            + [_seeded('b', 'gru', s, acc) for s, acc in zip((3, 4, 5), (0.98, 0.985, 0.99))]
            + [_seeded('a', 'rnn', s, acc) for s, acc in enumerate((0.11, 0.11, 0.11))]  # no spread: a point
            + [_seeded('b', 'rnn', s, acc) for s, acc in zip((3, 4, 5), (0.20, 0.21, 0.22))]
            + [_seeded('a', 'lstm', s, acc) for s, acc in enumerate((0.1, 1.0, 1.0))]  # bimodal: wide
            + [_seeded('b', 'lstm', s, acc) for s, acc in zip((3, 4, 5), (0.1, 0.1, 1.0))]
            + [_seeded('a', 'mingru', 0, 0.5)])  # one sweep only: not compared
    rows = {r['model.name']: r for r in reproduce.compare(runs, ['sweep', 'model.name'], 'test/accuracy')}
    assert set(rows) == {'gru', 'rnn', 'lstm'}
    gru, rnn, lstm = rows['gru'], rows['rnn'], rows['lstm']
    assert (gru['reference'], gru['rerun'], gru['reference_n'], gru['rerun_n']) == ('a', 'b', 3, 3)
    assert gru['rerun_inside_reference'] and gru['reference_inside_rerun']
    assert rnn['reference_interval'] == pytest.approx((0.11, 0.11))
    assert rnn['rerun_inside_reference'] is False and rnn['reference_inside_rerun'] is False
    assert lstm['rerun_inside_reference'] and lstm['reference_inside_rerun']
    assert lstm['reference_interval'][1] == 1.0  # clipped
    md = '\n'.join(reproduce.section(list(rows.values()), ['sweep', 'model.name'], 'test/accuracy'))
    assert "rerun's mean inside the reference's interval: 2 of 3 settings" in md
    assert 'outside both ways: 1: rnn' in md
    assert '| rnn | a (n=3) | 0.11 | [0.11, 0.11] | b (n=3) | 0.21 | [' in md
    assert reproduce.section([], ['model.name'], 'test/accuracy') == []


def test_report_over_two_seed_sweeps_states_the_rerun_interval_and_checks_it(tmp_path):
    first, second = str(tmp_path / 'seeds012'), str(tmp_path / 'seeds345')
    make_sweep(first, families=('lstm',), sizes=('tiny',), deps=(16, 64), seeds=(0, 1, 2))
    trials = make_sweep(second, families=('lstm',), sizes=('tiny',), deps=(16, 64), seeds=(3, 4, 5))
    for trial in trials:  # the rerun at length 64 falls apart: far outside the first sweep's interval
        path = os.path.join(second, trial['dir'], 'results.json')
        if trial['overrides']['task.dependency_length'] == 64 and os.path.exists(path):
            record = json.load(open(path))
            if record['status'] == 'done':
                record['metrics']['test/accuracy'] = 0.01 * trial['overrides']['train.seed']
                json.dump(record, open(path, 'w'))
    out = analysis.write_report([first, second], str(tmp_path / 'report'), {'plots': [], 'fits': False})
    report = open(out['paths']['report_md']).read()
    assert 'test/accuracy rerun 95%' in report.split('## Reproduction')[0]
    assert '## Reproduction across sweeps' in report
    assert "rerun's mean inside the reference's interval: 1 of 2 settings" in report
    rows = out['summary']['reproduction']
    assert [(r['task.dependency_length'], r['rerun_inside_reference']) for r in rows] == [(16, True), (64, False)]
    alone = analysis.write_report([first], str(tmp_path / 'alone'), {'plots': [], 'fits': False})
    text = open(alone['paths']['report_md']).read()
    assert '## Reproduction' not in text and alone['summary']['reproduction'] is None
    assert '| lstm | tiny | 16 | 2 | ' in text and '| [' in text  # the interval column of one sweep
    assert not out['paths']['plots'] and not alone['paths']['plots']  # plots=[]: none drawn


def test_a_report_checks_each_metric_the_spec_names_for_reproduction(tmp_path):
    first, second = str(tmp_path / 'seeds012'), str(tmp_path / 'seeds345')
    make_sweep(first, families=('lstm',), sizes=('tiny',), deps=(16,), seeds=(0, 1, 2))
    make_sweep(second, families=('lstm',), sizes=('tiny',), deps=(16,), seeds=(3, 4, 5))
    spec = {'plots': [], 'fits': False, 'reproduce': ['test/accuracy', 'test/loss']}
    out = analysis.write_report([first, second], str(tmp_path / 'report'), spec)
    report = open(out['paths']['report_md']).read()
    assert '## Reproduction across sweeps\n' in report and '## Reproduction across sweeps: test/loss' in report
    assert [r['metric'] for r in out['summary']['reproduction']] == ['test/accuracy', 'test/loss']
    with pytest.raises(UserError, match='unknown key'):
        analysis.write_report([first], str(tmp_path / 'bad'), {'plots': [], 'reproduces': ['test/loss']})



# --- selection on validation, never on test ---------------------------------------------

def _lr_record(size, lr, seed, dep):
    """lr 1e-2 is the better one on test; on validation 1e-3 is, by the mean over seeds
    (seed 0 of 1e-2 alone beats both seeds of 1e-3 there)."""
    E, A, alpha = LAWS['transformer']
    n = SIZES[size]
    base = E + A * n ** -alpha
    if lr == 1e-3:
        val_loss, test_loss, val_acc, test_acc = base, 1.05 * base, 0.80, 0.60
    else:
        val_loss, test_loss = base * (0.99, 1.05)[seed], 0.95 * base
        val_acc, test_acc = (0.85, 0.65)[seed], 0.90
    config = {'model.name': 'transformer', 'model.size': size, 'optim.learning_rate': lr, 'task.name': 'mqar',
              'task.dependency_length': dep, 'train.seed': seed}
    return {'status': 'done', 'name': f'{size}-{lr}-{dep}-{seed}', 'config': config, 'step': 100,
            'metrics': {'eval/loss': val_loss, 'test/loss': test_loss, 'eval/accuracy': val_acc,
                        'test/accuracy': test_acc},
            'params_non_embedding': n, 'train_flops': 6 * n * 3200, 'tokens': 3200}


def _write_sweep(root, records, swept):
    os.makedirs(root)
    trials = []
    for i, record in enumerate(records):
        overrides = {f: record['config'][f] for f in swept}
        trials.append(dict(index=i, name=record['name'], dir=f't{i}', overrides=overrides))
        os.makedirs(os.path.join(root, f't{i}'))
        with open(os.path.join(root, f't{i}', 'results.json'), 'w') as f:
            json.dump(record, f)
    with open(os.path.join(root, 'sweep.json'), 'w') as f:
        json.dump({'swept_fields': list(swept), 'trials': trials}, f)
    return analysis.load_runs([root])


LR_SWEPT = ('model.size', 'optim.learning_rate', 'task.dependency_length', 'train.seed')


def _lr_sweep(root):
    return _write_sweep(root, [_lr_record(size, lr, seed, dep) for size in SIZES for lr in (1e-3, 1e-2)
                               for dep in (16, 64) for seed in (0, 1)], LR_SWEPT)


def test_validation_twin_of_each_metric():
    assert tables.validation_metric('test/accuracy') == 'eval/accuracy'
    assert tables.validation_metric('test/dep_64/accuracy') == 'eval/dep_64/accuracy'
    assert tables.validation_metric('test/loss') == 'eval/loss'
    assert tables.validation_metric('eval/exact_match') == 'eval/exact_match'
    assert tables.validation_metric('best/eval/loss') == 'best/eval/loss'
    with pytest.raises(UserError, match='no validation metric'):
        tables.validation_metric('train/loss')


def test_tuned_values_are_chosen_on_validation_and_show_their_test_metric(tmp_path):
    from flaxformer_lite.analysis import plots_metrics, report
    runs = _lr_sweep(str(tmp_path / 'lr'))
    mean = lambda lr, m: np.mean([r.number(m) for r in runs if r.config['optim.learning_rate'] == lr])  # noqa: E731
    assert mean(1e-2, 'test/accuracy') > mean(1e-3, 'test/accuracy')  # test would pick 1e-2 ...
    assert mean(1e-2, 'test/loss') < mean(1e-3, 'test/loss')
    assert max(r.number('eval/accuracy') for r in runs) == 0.85  # ... and so would the best single seed
    for metric in ('test/accuracy', 'test/loss'):
        kept = tables.keep_best_tuned(runs, ['optim.learning_rate'], ['model.size', 'task.dependency_length'],
                                      metric)
        assert {r.config['optim.learning_rate'] for r in kept} == {1e-3}
        assert len(kept) == len(SIZES) * 2 * 2  # every seed of the chosen value
    # The fits: one point per size and seed, the test loss of the runs chosen on eval/loss.
    chosen = set()
    fits = analysis.analyse(runs, 'test/loss', n_boot=10, chosen=chosen)
    assert len(fits) == 2 and chosen == {('optim.learning_rate', 'test/loss'), ('the L(C) frontier', 'test/loss')}
    for fit in fits:
        expected = sorted(r.number('test/loss') for r in runs if r.config['optim.learning_rate'] == 1e-3
                          and r.config['task.dependency_length'] == fit.context['task.dependency_length'])
        assert sorted(fit.loss) == pytest.approx(expected)
    # The plot: each point is the mean test accuracy of the runs chosen on eval/accuracy.
    chosen = set()
    fig = plots_metrics.plot_metric_vs_x(runs, 'test/accuracy', 'task.dependency_length', ['model.size'], {},
                                         chosen=chosen)
    ys = [y for c in fig.axes[0].containers for y in c.lines[0].get_ydata()]
    assert len(ys) == len(SIZES) * 2 and ys == pytest.approx([0.60] * len(ys))
    assert chosen == {('optim.learning_rate', 'test/accuracy')}
    # choose() reads a test metric as its validation twin and shows the test metric of the choice.
    (row,) = report.choose(runs, 'optim.learning_rate', 'test/accuracy', ['model.name'])
    assert row['optim.learning_rate'] == 1e-3 and row['eval/accuracy'] == pytest.approx(0.80)
    assert row['test/accuracy'] == pytest.approx(0.60)
    # The report says what chose what.
    out = analysis.write_report([str(tmp_path / 'lr')], str(tmp_path / 'report'),
                                {'bootstrap': 10, 'plots': ['accuracy_vs_dependency_length', 'loss_vs_params']})
    text = open(out['paths']['report_md']).read()
    line = next(line for line in text.splitlines() if line.startswith('- best values kept'))
    assert 'optim.learning_rate by `eval/accuracy`, showing their `test/accuracy`' in line
    assert 'optim.learning_rate by `eval/loss`, showing their `test/loss`' in line
    assert 'the test split chooses nothing' in line


def test_a_run_without_the_validation_metric_is_an_error_not_a_fallback(tmp_path):
    runs = _lr_sweep(str(tmp_path / 'lr'))
    lacking = next(r for r in runs if r.config['optim.learning_rate'] == 1e-2 and r.config['model.size'] == 'mini')
    del lacking.record['metrics']['eval/accuracy']
    with pytest.raises(UserError) as e:
        tables.keep_best_tuned(runs, ['optim.learning_rate'], ['model.size', 'task.dependency_length'],
                               'test/accuracy')
    assert lacking.name in str(e.value) and 'reports no eval/accuracy' in str(e.value)
    # one value of the tuned field in a setting: nothing is chosen, nothing is needed
    alone = [r for r in runs if r.config['optim.learning_rate'] == 1e-2]
    assert tables.keep_best_tuned(alone, ['optim.learning_rate'], ['model.size'], 'test/accuracy') == alone


def test_the_training_length_of_each_size_is_chosen_on_validation(tmp_path):
    records = []
    for size, n in SIZES.items():
        for steps in (100, 200):  # the longer run is better on test and worse on validation
            base = 2.0 + 300 * n ** -0.3
            records.append({'status': 'done', 'name': f'{size}-{steps}', 'step': steps,
                            'config': {'model.name': 'lstm', 'model.size': size, 'train.steps': steps},
                            'metrics': {'eval/loss': base * (1.0 if steps == 100 else 1.1),
                                        'test/loss': base * (1.05 if steps == 100 else 0.9)},
                            'params_non_embedding': n, 'train_flops': 6 * n * 32 * steps})
    runs = _write_sweep(str(tmp_path / 'steps'), records, ('model.size', 'train.steps'))
    (fit,) = analysis.analyse(runs, 'test/loss', n_boot=10)
    expected = sorted(r.number('test/loss') for r in runs if r.config['train.steps'] == 100)
    assert sorted(fit.loss) == pytest.approx(expected)
    assert 'with the lowest eval/loss, and its test/loss' in fit.notes[0]


# --- convergence ------------------------------------------------------------------------

def test_rows_with_a_run_still_improving_are_marked(tmp_path):
    sweep = str(tmp_path / 'sweep')
    trials = make_sweep(sweep, families=('lstm',), sizes=('tiny', 'mini'), deps=(16,), seeds=(0, 1, 2))
    verdicts = {('tiny', 0): 'still_improving', ('tiny', 2): None,  # None: a record from before the check
                ('mini', 0): 'converged', ('mini', 1): 'converged', ('mini', 2): 'converged'}
    for trial in trials:
        path = os.path.join(sweep, trial['dir'], 'results.json')
        if not os.path.exists(path):
            continue
        record = json.load(open(path))
        status = verdicts.get((trial['overrides']['model.size'], trial['overrides']['train.seed']), 'converged')
        if status and record['status'] == 'done':
            record['convergence'] = {'status': status, 'metric': 'eval/loss', 'points': 5,
                                     'slope_per_1k_steps': -0.5 if status == 'still_improving' else 0.0,
                                     'rule': 'the rule'}
            json.dump(record, open(path, 'w'))
    runs = analysis.load_runs([sweep])
    assert [r.convergence for r in runs if r.config['model.size'] == 'tiny'] == \
        ['still_improving', 'unknown', 'unknown']  # seed 1 pending: no record at all
    out = analysis.write_report([sweep], str(tmp_path / 'report'), {'plots': [], 'fits': False})
    text = open(out['paths']['report_md']).read()
    assert '| lstm | tiny | 16 | 2 | 0/2 † (1 unknown) | ' in text  # one still improving, one without a verdict
    assert '| lstm | mini | 16 | 2 | 2/2 | ' in text  # the failed seed is not a run of the row
    legend = next(line for line in text.splitlines() if line.startswith('`converged`'))
    assert '† marks a row where a run was still improving' in legend and legend.endswith('Rule: the rule.')
    rows = {(r['model.size'], r['train.seed']): r for r in csv.DictReader(open(out['paths']['results_csv']))}
    assert rows[('tiny', '0')]['convergence'] == 'still_improving' and rows[('tiny', '1')]['convergence'] == ''
    aggregated = {r['model.size']: r for r in csv.DictReader(open(out['paths']['aggregated_csv']))}
    assert (aggregated['tiny']['n_converged'], aggregated['tiny']['n_still_improving'],
            aggregated['tiny']['n_unknown']) == ('0', '1', '1')


def _tuned_sweep(root, chosen, seeds, accuracy):
    """A tuned sweep's main trials (each family at its chosen rate) and its tuning.json."""
    records = [{'status': 'done', 'name': f'{family}-{seed}', 'step': 100,
                'config': {'model.name': family, 'optim.learning_rate': chosen[family], 'task.name': 'mqar',
                           'train.seed': seed},
                'metrics': {'eval/accuracy': acc + 0.01, 'test/accuracy': acc, 'eval/loss': 1 - acc,
                            'test/loss': 1 - acc}}
               for family in chosen for seed, acc in zip(seeds, accuracy[family])]
    runs = _write_sweep(root, records, ('model.name', 'optim.learning_rate', 'train.seed'))
    grid = (0.003, 0.01, 0.03, 0.1)
    groups = [{'group': {'model.name': family}, 'chosen': rate, 'at_edge': False, 'extended': [],
               'curve': [[v, 0.9 - abs(math.log10(v / rate)) / 10, 1] for v in grid]} for family, rate in chosen.items()]
    with open(os.path.join(root, 'tuning.json'), 'w') as f:
        json.dump({'metric': 'eval/accuracy', 'field': 'optim.learning_rate', 'lower_is_better': False, 'seeds': 1,
                   'groups': groups, 'extensions': {}, 'pending_extensions': {}}, f)
    return runs


def test_the_rerun_check_pairs_a_setting_that_the_two_sweeps_tuned_to_different_rates(tmp_path):
    # Seeds are the only difference, yet the tuning stage chose another rate for lstm in the
    # rerun: the rate is an outcome of the protocol, so lstm is still checked against itself.
    first, second = str(tmp_path / 'tuned_a'), str(tmp_path / 'tuned_b')
    _tuned_sweep(first, {'lstm': 0.01, 'gru': 0.003}, (0, 1, 2),
                 {'lstm': (0.90, 0.91, 0.92), 'gru': (0.80, 0.81, 0.82)})
    _tuned_sweep(second, {'lstm': 0.03, 'gru': 0.003}, (3, 4, 5),
                 {'lstm': (0.905, 0.915, 0.91), 'gru': (0.805, 0.815, 0.81)})
    out = analysis.write_report([first, second], str(tmp_path / 'report'),
                                {'plots': [], 'fits': False, 'metric': 'test/accuracy'})
    report = open(out['paths']['report_md']).read()
    section = report.split('## Reproduction across sweeps')[1].split('\n## ')[0]
    assert "rerun's mean inside the reference's interval: 2 of 2 settings" in section
    assert '| lstm | tuned_a (n=3) | 0.91 | [' in section and '| tuned_b (n=3) | 0.91 | [' in section
    assert 'learning_rate' not in section  # the tuned field is no column of the check
    rows = {r['model.name']: r for r in out['summary']['reproduction']}
    assert set(rows) == {'lstm', 'gru'} and 'optim.learning_rate' not in rows['lstm']
    assert (rows['lstm']['reference_n'], rows['lstm']['rerun_n']) == (3, 3)
    assert rows['lstm']['rerun_inside_reference'] and rows['lstm']['reference_inside_rerun']
    assert '## Tuning stage' in report  # both tuning.json files were read
