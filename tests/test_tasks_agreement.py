"""agreement: the subject's number found by a lexicon and grammar written here, the
distance and attractors checked, chance measured, impossible knobs refused."""

import re

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS

SINGULAR = set('cat dog key author farmer bird teacher child box painting pilot cabinet'.split())
PLURAL = set('cats dogs keys authors farmers birds teachers children boxes paintings pilots '
             'cabinets'.split())
CATEGORY = {'the': 'D', 'that': 'T', **{w: 'N' for w in SINGULAR | PLURAL},
            **{w: 'A' for w in 'old small red quiet famous clever'.split()},
            **{w: 'P' for w in 'near behind beside with above'.split()},
            **{w: 'V' for w in 'saw chased liked followed helped met'.split()},
            **{w: 'R' for w in 'probably certainly still'.split()}}
# subject noun phrase, then PPs / relative clauses (subject or object gap), then adverbs
GRAMMAR = re.compile(r'DA?N(PDA*N|TVDA*N|TDA*NV)*R*')


def build(**over):
    return tasks.build(dict(tasks.default_config('agreement').to_dict(), **over))


def parse(words):
    """(subject is plural, words between subject and end, later nouns' numbers)."""
    cats = ''.join(CATEGORY[w] for w in words)
    assert GRAMMAR.fullmatch(cats), ' '.join(words)
    subject = cats.index('N')
    nouns = [w in PLURAL for w in words[subject + 1:] if w in SINGULAR | PLURAL]
    return words[subject] in PLURAL, len(words) - subject - 1, nouns


@pytest.mark.parametrize('over', [{}, dict(dependency_length=0), dict(dependency_length=2),
                                  dict(relative_clauses=False, dependency_length=7)])
def test_classify_labels(over):
    task = build(**over)
    for split in SPLITS:
        for i in range(150):
            ex = task.example(split, i)
            text, label = task.decode(ex)
            plural, distance, _ = parse(text.split())
            assert label == ('plural' if plural else 'singular') and int(ex['targets']) == plural
            assert distance == task.cfg['dependency_length']
            if not task.cfg['relative_clauses']:
                assert 'that' not in text.split()


def test_lm_mode_predicts_the_verb():
    task = build(mode='lm', dependency_length=9)
    for i in range(300):
        ex = task.example('train', i)
        text, verb = task.decode(ex)
        words = text.split()
        at = words.index('is' if 'is' in words else 'are')
        plural, distance, _ = parse(words[:at])
        assert distance == 9 and verb == ('are' if plural else 'is')
        (pos,) = np.flatnonzero(ex['weights'])
        assert ex['targets'][pos] == ex['inputs'][pos + 1]  # the verb is the next token
        assert words[at + 2] == '.'


def last_noun_accuracy(task, n=1000):
    hits = 0
    for i in range(n):
        ex = task.example('train', i)
        _, _, nouns = parse(task.decode(ex)[0].split())
        hits += nouns[-1] == bool(ex['targets'])
    return hits / n


def test_attractors_mislead_the_last_noun_heuristic():
    assert last_noun_accuracy(build(attractors='opposite')) == 0.0
    assert abs(last_noun_accuracy(build(attractors='random')) - 0.5) < 0.06


def test_chance_matches_the_majority_class():
    task = build()
    fit = np.bincount([int(task.example('train', i)['targets']) for i in range(1000)])
    held = np.array([int(task.example('train', i)['targets']) for i in range(1000, 4000)])
    assert abs(np.mean(held == np.argmax(fit)) - task.chance()['accuracy']) < 0.03


@pytest.mark.parametrize('over,field', [
    (dict(mode='generate'), 'mode'),
    (dict(attractors='some'), 'attractors'),
    (dict(dependency_length=29), 'seq_len'),
    (dict(mode='lm', dependency_length=27), 'seq_len'),
    (dict(dependency_length=-2), 'dependency_length'),
])
def test_impossible_knobs(over, field):
    with pytest.raises(ConfigError, match=rf'^task\.{field}: '):
        build(**over)
