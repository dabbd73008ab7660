"""seq2seq: targets re-derived from the decoded source (copy, reverse, sort), EOS and
padding checked, exact-match chance measured, impossible knobs refused."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS

SOLVE = {'copy': list, 'reverse': lambda s: s[::-1], 'sort': sorted}


def build(**over):
    return tasks.build(dict(tasks.default_config('seq2seq').to_dict(), **over))


@pytest.mark.parametrize('mode', sorted(SOLVE))
@pytest.mark.parametrize('variable', [False, True])
def test_targets(mode, variable):
    task = build(mode=mode, variable_length=variable)
    spec, d = task.spec, task.cfg['dependency_length']
    lengths = set()
    for split in SPLITS:
        for i in range(100):
            ex = task.example(split, i)
            source, target = (s.split() for s in task.decode(ex))
            assert target == SOLVE[mode](source) + ['</s>']
            n = len(source)
            lengths.add(n)
            assert np.all(ex['inputs'][n:] == spec.pad_id) and np.all(ex['inputs'][:n] != spec.pad_id)
            assert ex['weights'].sum() == n + 1 and np.all(ex['targets'][n + 1:] == spec.pad_id)
            assert ex['targets'][n] not in ex['inputs']  # EOS is its own token
            assert spec.bos_id not in ex['targets']  # the decoder start is never a target
    assert (min(lengths) <= 3 and max(lengths) == d) if variable else lengths == {d}


@pytest.mark.parametrize('mode', sorted(SOLVE))
def test_exact_match_chance(mode):
    """The best content-blind predictor: the commonest target of the source's length.

    Measured on the generator's own draws: in a space this small (39 sources) the hash
    split would itself skew each split's distribution, which chance() does not model.
    """
    task = build(mode=mode, dependency_length=3, num_symbols=3, seq_len=3, variable_length=True)
    rng = np.random.default_rng(0)
    by_length = defaultdict(Counter)
    for i in range(3000):
        ex = task._generate(rng)
        by_length[int((ex['inputs'] != 0).sum())][ex['targets'].tobytes()] += 1
    hits = []
    for i in range(4000):
        ex = task._generate(rng)
        guess = by_length[int((ex['inputs'] != 0).sum())].most_common(1)[0][0]
        hits.append(guess == ex['targets'].tobytes())
    expected = task.chance()['exact_match']
    assert abs(np.mean(hits) - expected) < 0.03, (np.mean(hits), expected)


def test_token_accuracy_chance_for_reverse():
    task = build(mode='reverse', dependency_length=4, num_symbols=4, seq_len=4)
    counts = defaultdict(Counter)
    for i in range(2000):
        ex = task.example('train', i)
        for p in np.flatnonzero(ex['weights']):
            counts[p][int(ex['targets'][p])] += 1
    hits = total = 0
    for i in range(2000, 4000):
        ex = task.example('train', i)
        for p in np.flatnonzero(ex['weights']):
            hits += counts[p].most_common(1)[0][0] == ex['targets'][p]
            total += 1
    assert abs(hits / total - task.chance()['accuracy']) < 0.02


@pytest.mark.parametrize('over,field', [
    (dict(mode='translate'), 'mode'),
    (dict(dependency_length=33), 'seq_len'),
    (dict(num_symbols=1), 'num_symbols'),
    (dict(variable_length=2), 'variable_length'),
])
def test_impossible_knobs(over, field):
    with pytest.raises(ConfigError, match=rf'^task\.{field}: '):
        build(**over)
