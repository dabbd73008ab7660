"""ListOps: an evaluator written here (recursive descent over the decoded text, with
statistics.median) checks every answer; structure knobs, chance, and the LRA TSV
reader (format, splits, every kind of bad file)."""

import random
import statistics

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS

FUNCS = {
    '[MAX': max,
    '[MIN': min,
    '[MED': lambda xs: int(statistics.median(xs)),  # LRA: int(np.median)
    '[SM': lambda xs: sum(xs) % 10,
}


def build(**over):
    return tasks.build(dict(tasks.default_config('listops').to_dict(), **over))


def evaluate(text):
    """(value, depth, arities) of one expression; parentheses (LRA) are ignored."""
    words = [w for w in text.split() if w not in '()']
    arities = []

    def node(i, depth):
        if words[i].isdigit():
            return int(words[i]), i + 1, depth - 1
        op, i, args, deepest = words[i], i + 1, [], depth
        while words[i] != ']':
            value, i, d = node(i, depth + 1)
            args.append(value)
            deepest = max(deepest, d)
        arities.append(len(args))
        return FUNCS[op](args), i + 1, deepest

    value, end, depth = node(0, 1)
    assert end == len(words), 'trailing tokens'
    return value, depth, arities


def test_evaluator_on_known_expressions():
    assert evaluate('[MAX 2 9 [MIN 4 7 ] 0 ]')[0] == 9
    assert evaluate('[SM 3 [MED 8 1 5 ] 4 ]')[0] == 2
    assert evaluate('[MED 1 2 ]')[0] == 1 and evaluate('[MED 3 8 4 9 ]')[0] == 6
    assert evaluate('( ( ( ( [MAX 2 ) 9 ) 4 ) ] )') == (9, 1, [3])


@pytest.mark.parametrize('over', [
    {},
    dict(max_depth=1, max_arity=10, seq_len=12, dependency_length=4),
    dict(max_depth=2, max_arity=3, seq_len=17, dependency_length=17),  # the full tree
    dict(max_depth=10, max_arity=10, seq_len=400, dependency_length=200),
])
def test_generated_answers_and_structure(over):
    task = build(**over)
    c = task.cfg
    lengths = []
    for split in SPLITS:
        for i in range(120):
            ex = task.example(split, i)
            text, target = task.decode(ex)
            value, depth, arities = evaluate(text)
            assert value == int(target) == int(ex['targets'])
            assert depth <= c['max_depth'] and 2 <= min(arities) and max(arities) <= c['max_arity']
            n = int((ex['inputs'] != 0).sum())
            assert np.all(ex['inputs'][n:] == 0)
            assert c['dependency_length'] <= n <= c['seq_len']  # exact unless arity 2
            lengths.append(n)
    span = c['seq_len'] - c['dependency_length']
    assert max(lengths) - min(lengths) >= 0.8 * span  # lengths cover the range


def test_binary_trees_come_within_two_tokens():
    task = build(max_arity=2, max_depth=4, seq_len=40, dependency_length=20)
    for i in range(200):
        n = int((task.example('train', i)['inputs'] != 0).sum())
        assert 18 <= n <= 40 and n % 3 == 1  # binary: 3m + 1 tokens


@pytest.mark.parametrize('over', [{}, dict(max_depth=1, max_arity=10, seq_len=12, dependency_length=4)])
def test_chance_matches_the_majority_class(over):
    task = build(**over)
    fit = np.bincount([int(task.example('train', i)['targets']) for i in range(1000)], minlength=10)
    held = np.array([int(task.example('train', i)['targets']) for i in range(1000, 4000)])
    measured = float(np.mean(held == np.argmax(fit)))
    assert abs(measured - task.chance()['accuracy']) < 0.03, (measured, task.chance())


def test_flat_expressions_are_skewed_and_chance_says_so():
    flat = build(max_depth=1, max_arity=10, seq_len=12, dependency_length=4).chance()['accuracy']
    assert flat > 0.13  # MIN pulls answers to 0, MAX to 9


BAD = [
    (dict(max_depth=0), 'max_depth'),
    (dict(max_arity=1), 'max_arity'),
    (dict(max_depth=2, max_arity=3, dependency_length=18, seq_len=20), 'max_depth'),
    (dict(dependency_length=3), 'dependency_length'),
    (dict(seq_len=63), 'seq_len'),
]


@pytest.mark.parametrize('over,field', BAD)
def test_impossible_knobs(over, field):
    with pytest.raises(ConfigError, match=rf'^task\.{field}: '):
        build(**over)


# --- TSV files in the LRA release format -------------------------------------------

def lra_tree(rng, depth):
    """A random expression, written the way LRA's generator binarises it."""
    if depth > 3 or (depth > 1 and rng.random() < 0.5):
        d = rng.randrange(10)
        return str(d), d
    op = rng.choice(list(FUNCS))
    kids = [lra_tree(rng, depth + 1) for _ in range(rng.randint(2, 4))]
    text = f'( {op} {kids[0][0]} )'
    for kid, _ in kids[1:]:
        text = f'( {text} {kid} )'
    return f'( {text} ] )', FUNCS[op]([v for _, v in kids])


def write_tsv(path, rows, header=True):
    lines = (['Source\tTarget'] if header else []) + [f'{s}\t{t}' for s, t in rows]
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def lra_rows(seed, n):
    rng = random.Random(seed)
    return [lra_tree(rng, 1) for _ in range(n)]


def test_reads_lra_rows_split_by_content(tmp_path):
    rows = lra_rows(0, 150)
    path = write_tsv(tmp_path / 'listops.tsv', rows)
    task = build(files=path, seq_len=200)
    assert sum(task.num_examples(s) for s in SPLITS) == len(rows)
    seen = {}
    for split in SPLITS:
        seen[split] = set()
        for i in range(task.num_examples(split)):
            ex = task.example(split, i)
            text, target = task.decode(ex)
            assert evaluate(text)[0] == int(target)
            seen[split].add(text)
    expected = {evaluate(s)[0] for s, _ in rows}
    assert expected <= set(range(10))
    assert not (seen['train'] & seen['eval']) and not (seen['eval'] & seen['test'])
    assert set().union(*seen.values()) == {' '.join(w for w in s.split() if w not in '()')
                                           for s, _ in rows}
    np.testing.assert_array_equal(task.example('train', task.num_examples('train'))['inputs'],
                                  task.example('train', 0)['inputs'])
    assert 0 < task.chance()['accuracy'] < 1


def test_per_split_files_keep_their_split_and_stay_disjoint(tmp_path):
    train, val, test = lra_rows(1, 40), lra_rows(2, 10), lra_rows(3, 12)
    test.append(train[0])  # a row in two files: test keeps it
    write_tsv(tmp_path / 'basic_train.tsv', train)
    write_tsv(tmp_path / 'basic_val.tsv', val, header=False)  # the header is optional
    write_tsv(tmp_path / 'basic_test.tsv', test)
    task = build(files=str(tmp_path / 'basic_*.tsv'), seq_len=200)
    dup = sum(r == train[0] for r in train)
    assert task.num_examples('train') == len(train) - dup
    assert task.num_examples('eval') == len(val)
    assert task.num_examples('test') == len(test)
    texts = {s: {task.decode(task.example(s, i))[0] for i in range(task.num_examples(s))}
             for s in SPLITS}
    assert not (texts['train'] & texts['test']) and not (texts['train'] & texts['eval'])


def test_tuple_of_globs(tmp_path):
    a = write_tsv(tmp_path / 'a_train.tsv', lra_rows(4, 5))
    b = write_tsv(tmp_path / 'b_val.tsv', lra_rows(5, 5))
    c = write_tsv(tmp_path / 'c_test.tsv', lra_rows(6, 5))
    task = build(files=(a, b, c), seq_len=200)
    assert [task.num_examples(s) for s in SPLITS] == [5, 5, 5]
    with pytest.raises(ConfigError, match=r'^eval\.dependency_lengths'):
        task.with_dependency_length(100)


def bad_file(tmp_path, kind):
    path = tmp_path / 'bad_train.tsv'
    good = '( ( ( [MAX 2 ) 9 ) ] )'
    if kind == 'missing':
        return str(tmp_path / 'nope.tsv')
    if kind == 'no_match':
        return str(tmp_path / 'nothing_*.tsv')
    if kind == 'empty':
        path.write_text('')
    elif kind == 'binary':
        path.write_bytes(b'Source\tTarget\n\x00\x01\x02\xff')
    elif kind == 'three_fields':
        path.write_text(f'Source\tTarget\n{good}\t9\textra\n')
    elif kind == 'bad_target':
        path.write_text(f'Source\tTarget\n{good}\tnine\n')
    elif kind == 'unknown_token':
        path.write_text('Source\tTarget\n( ( ( [PROD 2 ) 9 ) ] )\t8\n')
    elif kind == 'unbalanced':
        path.write_text('Source\tTarget\n( ( [MAX 2 ) 9 )\t9\n')
    elif kind == 'header_only':
        path.write_text('Source\tTarget\n')
    return str(path)


@pytest.mark.parametrize('kind', ['missing', 'no_match', 'empty', 'binary', 'three_fields',
                                  'bad_target', 'unknown_token', 'unbalanced', 'header_only'])
def test_bad_files_name_task_files(tmp_path, kind):
    with pytest.raises(ConfigError, match=r'^task\.files: ') as err:
        build(files=bad_file(tmp_path, kind))
    assert '\n' not in str(err.value)
    if kind in ('three_fields', 'bad_target', 'unknown_token', 'unbalanced'):
        assert 'line 2' in str(err.value)


def test_row_longer_than_seq_len_names_seq_len(tmp_path):
    path = write_tsv(tmp_path / 'x_train.tsv', [('[MAX ' + '1 ' * 30 + ']', 1)])
    with pytest.raises(ConfigError, match=r'^task\.seq_len: .*32 tokens'):
        build(files=path, seq_len=16)


def test_a_split_without_rows_is_refused(tmp_path):
    path = write_tsv(tmp_path / 'basic_train.tsv', lra_rows(7, 5))
    with pytest.raises(ConfigError, match=r"^task\.files: no rows fall in split 'eval'"):
        build(files=path, seq_len=200)
