"""Whether a run had converged: the rule on synthetic validation curves (flat and noisy,
falling, too short, an accuracy), and the curve read from a run's event files as
TensorBoard shows it, events a resumed run logged again counted once."""

import math
import time

import numpy as np
import pytest

from flaxformer_lite import tracking
from flaxformer_lite.train import results


def _curve(values, every=50, last=1000):
    steps = range(every, last + 1, every)
    return [(s, float(values(s))) for s in steps]


def test_a_flat_noisy_curve_has_converged():
    rng = np.random.default_rng(0)
    verdict = results.convergence(_curve(lambda s: 2.0 + 0.02 * rng.standard_normal()), 1000)
    assert verdict['status'] == 'converged' and verdict['metric'] == 'eval/loss'
    assert verdict['points'] == 6 and verdict['window'] == [750, 1000]  # the last quarter of 1000 steps
    assert verdict['rule'] == results.CONVERGENCE_RULE and -verdict['change'] <= verdict['threshold']


def test_a_steadily_falling_curve_is_still_improving():
    rng = np.random.default_rng(1)
    verdict = results.convergence(_curve(lambda s: 3.0 - 1e-3 * s + 0.01 * rng.standard_normal()), 1000)
    assert verdict['status'] == 'still_improving'
    assert verdict['slope_per_1k_steps'] == pytest.approx(-1.0, abs=0.15)
    exact = results.convergence(_curve(lambda s: 3.0 - 1e-3 * s), 1000)
    assert exact['slope_per_1k_steps'] == pytest.approx(-1.0) and exact['change'] == pytest.approx(-0.25)


def test_a_fall_within_the_noise_or_below_one_percent_is_not_improvement():
    zigzag = _curve(lambda s: 2.0 - 1e-4 * s + 0.1 * (-1) ** (s // 50 + 1))
    noisy = results.convergence(zigzag, 1000)
    assert noisy['status'] == 'converged' and -noisy['threshold'] < noisy['change'] < 0  # falls, within 2 SE
    slow = results.convergence(_curve(lambda s: 2.0 - 2e-5 * s), 1000)  # 0.005 over the window: 0.3%
    assert slow['status'] == 'converged' and slow['threshold'] == pytest.approx(0.01 * 1.9825)
    solved = results.convergence(_curve(lambda s: 0.003 - 2e-6 * s), 1000)  # a solved task's loss creeping to 0
    assert solved['status'] == 'converged' and solved['change'] == pytest.approx(-5e-4)
    assert solved['threshold'] == results.CONVERGENCE_FLOOR
    rising = results.convergence(_curve(lambda s: 1.0 + 1e-3 * s), 1000)  # overfitting: not improving
    assert rising['status'] == 'converged' and rising['slope_per_1k_steps'] > 0


def test_too_few_evaluations_in_the_last_quarter_are_unknown():
    verdict = results.convergence([(250, 3.0), (500, 2.0), (750, 1.5), (1000, 1.2)], 1000)
    assert verdict['status'] == 'unknown' and verdict['points'] == 2 and verdict['slope_per_1k_steps'] is None
    assert results.convergence([], 1000)['status'] == 'unknown'
    # a step logged twice counts once (its last value); non-finite values are left out
    twice = [(800, 2.0), (900, 1.9), (900, 1.8), (1000, math.nan)]
    assert results.convergence(twice, 1000)['points'] == 2
    assert results.convergence(twice + [(1000, 1.7)], 1000)['points'] == 3


def test_higher_is_better_metrics_improve_upwards():
    rising = _curve(lambda s: 0.2 + 5e-4 * s)
    assert results.convergence(rising, 1000, metric='eval/accuracy')['status'] == 'still_improving'
    falling = _curve(lambda s: 0.9 - 5e-4 * s)
    assert results.convergence(falling, 1000, metric='eval/accuracy')['status'] == 'converged'
    assert results.convergence(falling, 1000, metric='eval/accuracy', lower_is_better=True)['status'] == \
        'still_improving'


def test_the_curve_from_event_files_counts_a_resumed_run_once(tmp_path):
    first = tracking.Writer(str(tmp_path))
    first.restart_at(0)  # as the loop does: the first session's start, then each resume's
    for step in range(1, 11):
        first.scalars(step, {'eval/loss': 10.0 - step, 'train/loss': 1.0})
    first.close()  # stopped at step 10; its last checkpoint was step 6
    time.sleep(1.1)  # event files are read in name order, which starts with the second they were made in
    resumed = tracking.Writer(str(tmp_path))
    resumed.restart_at(7)
    for step in range(7, 13):
        resumed.scalars(step, {'eval/loss': 100.0 - step})
    resumed.close()
    series = results.event_series(str(tmp_path), 'eval/loss')
    assert [s for s, _ in series] == list(range(1, 13))  # steps 7-10 once, from the resumed run
    assert dict(series)[6] == 4.0 and dict(series)[7] == 93.0
    assert results.event_series(str(tmp_path), 'eval/accuracy') == []
    verdict = results.run_convergence(str(tmp_path), 12)
    assert verdict['points'] == 4 and verdict['window'] == [9, 12] and verdict['status'] == 'still_improving'
    assert results.run_convergence(str(tmp_path / 'nothing'), 12)['status'] == 'unknown'
