"""copy, selective_copy, mqar, recall, induction: answers re-derived from the decoded
text by solvers written here, chance levels measured, impossible knobs refused."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError

LM_RECALL = ('copy', 'selective_copy', 'mqar', 'recall', 'induction')


def build(name, **over):
    return tasks.build(dict(tasks.default_config(name).to_dict(), **over))


def answers(task, ex):
    """(position, input word, answer word) of the weighted positions, from decode."""
    words = task.decode(ex)[0].split()
    where = np.flatnonzero(ex['weights'])
    return words, where


# --- solvers ---------------------------------------------------------------------

def solve_copy(words):
    """Data = symbols after '^' up to the first blank / delimiter; returns (data, blanks)."""
    assert words[0] == '^'
    end = next(i for i, w in enumerate(words) if w in ('_', ':'))
    colon = words.index(':')
    assert all(w == '_' for w in words[end:colon])
    return words[1:end], colon - end


def solve_selective(words):
    colon = words.index(':')
    region = words[1:colon]
    return [w for w in region if w != '_'], len(region)


def bindings(words):
    """The first run of alternating key / value words."""
    start = next(i for i, w in enumerate(words) if w.startswith('k'))
    out = {}
    i = start
    while i + 1 < len(words) and words[i].startswith('k') and words[i + 1].startswith('v'):
        out.setdefault(words[i], words[i + 1])
        i += 2
    return out, start, i


@pytest.mark.parametrize('over', [{}, dict(dependency_length=0), dict(num_tokens=3, num_symbols=2)])
def test_copy_answers(over):
    task = build('copy', **over)
    for i in range(200):
        ex = task.example('train', i)
        data, blanks = solve_copy(task.decode(ex)[0].split())
        assert len(data) == task.cfg['num_tokens'] and blanks == task.cfg['dependency_length']
        assert task.decode(ex)[1].split() == data
        assert ex['weights'].sum() == len(data)


@pytest.mark.parametrize('over', [{}, dict(dependency_length=8, num_tokens=8, seq_len=17)])
def test_selective_copy_answers(over):
    task = build('selective_copy', **over)
    for i in range(200):
        ex = task.example('eval', i)
        data, region = solve_selective(task.decode(ex)[0].split())
        assert region == task.cfg['dependency_length'] and len(data) == task.cfg['num_tokens']
        assert task.decode(ex)[1].split() == data


def test_selective_copy_positions_vary():
    task = build('selective_copy')
    first = set()
    for i in range(50):
        words = task.decode(task.example('train', i))[0].split()
        first.add(next(p for p, w in enumerate(words) if w not in ('^', '_')))
    assert len(first) > 5  # content, not position, says what to copy


@pytest.mark.parametrize('name', ['mqar', 'recall'])
def test_recall_answers(name):
    task = build(name)
    c = task.cfg
    for i in range(200):
        ex = task.example('test', i)
        words, where = answers(task, ex)
        bound, start, end = bindings(words)
        assert len(bound) == c['num_pairs']
        asked = []
        for pos in where:
            key = words[pos]
            assert key in bound
            assert pos - end >= c['dependency_length'] - 1  # at least the gap away
            asked.append(key)
        got = [a.split('->') for a in task.decode(ex)[1].split()]
        assert [k for k, _ in got] == asked and all(bound[k] == v for k, v in got)
        if name == 'mqar':
            assert sorted(asked) == sorted(bound)  # every key queried once
            assert len(set(bound.values())) == len(bound)  # distinct values (Zoology)


def test_mqar_queries_are_power_law_spaced():
    task = build('mqar', power_a=0.01)
    def offsets(t):
        start = 1 + 2 * t.cfg['num_pairs'] + t.cfg['dependency_length']  # query region
        return np.concatenate([np.flatnonzero(t.example('train', i)['weights']) - start
                               for i in range(300)])

    near = offsets(task)
    assert near.min() >= 0 and np.all(near % 2 == 0) and near.max() < 2 * task.space
    assert np.mean(near < task.space) > 0.6  # g^(a-1) favours the first half of the region
    flat = offsets(build('mqar', power_a=1.0))
    assert abs(np.mean(flat < task.space) - 0.5) < 0.05


@pytest.mark.parametrize('over', [{}, dict(dependency_length=2, seq_len=8, num_symbols=3)])
def test_induction_answers(over):
    task = build('induction', **over)
    for i in range(300):
        ex = task.example('train', i)
        words = task.decode(ex)[0].split()
        trigger = words[-1]
        earlier = [p for p, w in enumerate(words[:-1]) if w == trigger]
        assert len(earlier) == 1
        assert len(words) - 1 - earlier[0] == task.cfg['dependency_length']
        assert task.decode(ex)[1] == f'{trigger}->{words[earlier[0] + 1]}'


# --- chance ----------------------------------------------------------------------

def fit_eval(task, predict_fit, predict, n_fit=800, n_eval=2000):
    """Accuracy on weighted positions of a predictor that never looks back."""
    counts = defaultdict(Counter)
    for i in range(n_fit):
        ex = task.example('train', i)
        for pos in np.flatnonzero(ex['weights']):
            predict_fit(counts, pos, ex)
    hits = total = 0
    for i in range(n_fit, n_fit + n_eval):
        ex = task.example('train', i)
        for pos in np.flatnonzero(ex['weights']):
            hits += predict(counts, pos, ex) == ex['targets'][pos]
            total += 1
    return hits / total


@pytest.mark.parametrize('name', ['copy', 'selective_copy', 'mqar', 'recall'])
def test_chance_matches_a_position_majority_predictor(name):
    task = build(name)

    def fit(counts, pos, ex):
        counts[pos][int(ex['targets'][pos])] += 1

    def predict(counts, pos, ex):
        return counts[pos].most_common(1)[0][0] if counts[pos] else -1

    measured = fit_eval(task, fit, predict)
    assert abs(measured - task.chance()['accuracy']) < 0.02, measured


def test_induction_chance_matches_a_no_look_back_predictor():
    task = build('induction')

    def fit(counts, pos, ex):
        counts[0][int(ex['targets'][pos])] += 1

    def predict(counts, pos, ex):  # the most frequent answer that is not the current token
        return next(t for t, _ in counts[0].most_common() if t != ex['inputs'][pos])

    measured = fit_eval(task, fit, predict, n_eval=3000)
    assert abs(measured - task.chance()['accuracy']) < 0.015, measured


# --- impossible knobs ------------------------------------------------------------

BAD = [
    ('copy', dict(seq_len=40), 'seq_len'),
    ('copy', dict(num_symbols=1), 'num_symbols'),
    ('copy', dict(num_tokens=0), 'num_tokens'),
    ('selective_copy', dict(num_tokens=10, dependency_length=8), 'dependency_length'),
    ('selective_copy', dict(dependency_length=0), 'dependency_length'),
    ('selective_copy', dict(seq_len=60), 'seq_len'),
    ('mqar', dict(num_pairs=70), 'num_pairs'),
    ('mqar', dict(num_values=8), 'num_pairs'),
    ('mqar', dict(seq_len=79), 'seq_len'),
    ('mqar', dict(power_a=0.0), 'power_a'),
    ('mqar', dict(num_noise=0), 'num_noise'),
    ('induction', dict(dependency_length=1), 'dependency_length'),
    ('induction', dict(num_symbols=2), 'num_symbols'),
    ('induction', dict(dependency_length=63), 'seq_len'),
]


@pytest.mark.parametrize('name,over,field', BAD)
def test_impossible_knobs_name_the_field(name, over, field):
    with pytest.raises(ConfigError, match=rf'^task\.{field}: ') as err:
        build(name, **over)
    assert '\n' not in str(err.value)
