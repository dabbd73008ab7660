"""parity and dyck: labels recomputed here (bit count, bracket stack), near misses
checked to defeat counting, chance measured, impossible knobs refused."""

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS

CLOSE = {')': '(', ']': '[', '}': '{', '>': '<'}


def build(name, **over):
    return tasks.build(dict(tasks.default_config(name).to_dict(), **over))


def majority_accuracy(task, n_fit=1000, n_eval=3000):
    fit = np.bincount([int(task.example('train', i)['targets']) for i in range(n_fit)])
    held = np.array([int(task.example('train', i)['targets']) for i in range(n_fit, n_fit + n_eval)])
    return float(np.mean(held == np.argmax(fit)))


# --- parity ------------------------------------------------------------------------

@pytest.mark.parametrize('over', [{}, dict(variable_length=True), dict(dependency_length=64)])
def test_parity_labels(over):
    task = build('parity', **over)
    lengths = set()
    for split in SPLITS:
        for i in range(150):
            ex = task.example(split, i)
            bits, label = task.decode(ex)
            assert set(bits) <= {'0', '1'}
            assert label == ('odd' if bits.count('1') % 2 else 'even')
            assert int(ex['targets']) == bits.count('1') % 2
            lengths.add(len(bits))
    d = task.cfg['dependency_length']
    if task.cfg['variable_length']:
        assert min(lengths) < d // 4 and max(lengths) == d
    else:
        assert lengths == {d}


def test_parity_chance():
    task = build('parity')
    assert abs(majority_accuracy(task) - task.chance()['accuracy']) < 0.03


# --- dyck ----------------------------------------------------------------------------

def check(text, max_depth=None):
    """(balanced, deepest) by a stack; depth bound checked only when given."""
    stack, deepest = [], 0
    for ch in text.split():
        if ch in CLOSE:
            if not stack or stack.pop() != CLOSE[ch]:
                return False, deepest
        else:
            stack.append(ch)
            deepest = max(deepest, len(stack))
    return not stack, deepest


def test_checker_on_known_strings():
    assert check('( [ ] ( ) )') == (True, 2)
    assert not check('( [ ) ( ] )')[0] and not check(') (')[0] and not check('( (')[0]


@pytest.mark.parametrize('over', [{}, dict(num_types=1, max_depth=3), dict(num_types=4, dependency_length=6)])
def test_dyck_labels(over):
    task = build('dyck', **over)
    c = task.cfg
    kinds = set()
    for split in SPLITS:
        for i in range(150):
            ex = task.example(split, i)
            text, label = task.decode(ex)
            ok, deepest = check(text)
            assert label == ('balanced' if ok else 'unbalanced') and int(ex['targets']) == ok
            assert len(text.split()) == c['dependency_length']
            if ok:
                assert deepest <= c['max_depth']
            kinds.update(text.split())
    assert len(kinds) == 2 * c['num_types']


def test_dyck_negatives_are_near_misses():
    """Counting each bracket kind (and the length) says nothing about the label."""
    task = build('dyck')
    counting_right = deep_right = 0
    n = 2000
    for i in range(n):
        ex = task.example('train', i)
        words = task.decode(ex)[0].split()
        counts_match = all(words.count(o) == words.count(c) for c, o in CLOSE.items())
        assert counts_match  # swaps keep every count
        counting_right += int(ex['targets']) == 1  # the counting predictor says 'balanced'
        depth, never_negative = 0, True  # a depth counter that ignores bracket kinds
        for w in words:
            depth += -1 if w in CLOSE else 1
            never_negative &= depth >= 0
        deep_right += int(ex['targets']) == int(never_negative and depth == 0)
    assert abs(counting_right / n - 0.5) < 0.04
    assert deep_right / n < 0.9  # type-swapped negatives fool a kind-blind counter


def test_dyck_chance():
    task = build('dyck')
    assert abs(majority_accuracy(task) - task.chance()['accuracy']) < 0.03


BAD = [
    ('parity', dict(dependency_length=65), 'seq_len'),
    ('parity', dict(dependency_length=0), 'dependency_length'),
    ('parity', dict(variable_length='sometimes'), 'variable_length'),
    ('dyck', dict(dependency_length=31), 'dependency_length'),
    ('dyck', dict(num_types=5), 'num_types'),
    ('dyck', dict(max_depth=0), 'max_depth'),
    ('dyck', dict(dependency_length=66), 'seq_len'),
]


@pytest.mark.parametrize('name,over,field', BAD)
def test_impossible_knobs(name, over, field):
    with pytest.raises(ConfigError, match=rf'^task\.{field}: '):
        build(name, **over)
