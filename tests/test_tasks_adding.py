"""adding: the sum recomputed from the decoded text and from the documented token
encoding, marker placement checked, the predict-the-mean MSE measured."""

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS


def build(**over):
    return tasks.build(dict(tasks.default_config('adding').to_dict(), **over))


@pytest.mark.parametrize('over', [{}, dict(seq_len=100, dependency_length=50, num_bins=100),
                                  dict(seq_len=10, dependency_length=1, num_bins=2)])
def test_target_is_the_sum_of_the_two_marked_values(over):
    task = build(**over)
    n, d, b = task.cfg['seq_len'], task.cfg['dependency_length'], task.cfg['num_bins']
    firsts = []
    for split in SPLITS:
        for i in range(150):
            ex = task.example(split, i)
            text, target = task.decode(ex)
            words = text.split()
            marked = [p for p, w in enumerate(words) if w.startswith('[')]
            assert len(marked) == 2 and len(words) == n
            total = sum(float(words[p].strip('[]')) for p in marked)
            assert abs(total - float(target)) < 1e-4
            # token = 2 + bin + marked * num_bins; value = (bin + 0.5) / num_bins
            tokens = ex['inputs'] - 2
            flags = tokens >= b
            assert list(np.flatnonzero(flags)) == marked
            values = (tokens % b + 0.5) / b
            assert abs(values[flags].sum() - float(ex['targets'])) < 1e-6
            first, second = marked
            assert first < n - d <= second  # the first is at least dependency_length back
            firsts.append(first)
    assert min(firsts) == 0 and max(firsts) == n - d - 1


@pytest.mark.parametrize('bins', [16, 2])
def test_chance_is_the_mse_of_the_mean(bins):
    task = build(num_bins=bins)
    fit = np.mean([float(task.example('train', i)['targets']) for i in range(1000)])
    held = np.array([float(task.example('train', i)['targets']) for i in range(1000, 4000)])
    measured = float(np.mean((held - fit) ** 2))
    expected = task.chance()['mse']
    assert abs(measured - expected) < 0.08 * expected, (measured, expected)
    if bins == 16:
        assert abs(expected - 1 / 6) < 0.002  # nearly the continuous problem's 1/6


@pytest.mark.parametrize('over,field', [
    (dict(dependency_length=64), 'seq_len'),
    (dict(dependency_length=0), 'dependency_length'),
    (dict(num_bins=1), 'num_bins'),
])
def test_impossible_knobs(over, field):
    with pytest.raises(ConfigError, match=rf'^task\.{field}: '):
        build(**over)
