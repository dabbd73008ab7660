"""text_lm: every example is found verbatim in the corpus read here, splits partition
the chunks, the unigram chance is measured, and bad files are refused."""

import glob
import os
import random

import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks import text_lm
from flaxformer_lite.tasks.base import SPLITS


def build(**over):
    return tasks.build(dict(tasks.default_config('text_lm').to_dict(), **over))


def stdlib_corpus():
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), '*.py')))
    parts = []
    for f in files:
        with open(f, 'rb') as fh:
            parts.append(fh.read())
    return b'\n'.join(parts)


def write_text(path, seed, size=20_000):
    rng = random.Random(seed)
    words = 'the quick brown fox jumps over lazy dogs while long range models wait'.split()
    text = []
    while sum(map(len, text)) < size:
        text.append(' '.join(rng.choice(words) for _ in range(rng.randint(3, 12))) + '.\n')
    path.write_text(''.join(text))
    return path.read_bytes()


def chunk_bytes(ex):
    return bytes(ex['inputs'].astype(np.uint8)) + bytes(ex['targets'][-1:].astype(np.uint8))


def test_default_corpus_is_the_standard_library():
    task = build()
    assert task.report_loss_by_position is True
    corpus = stdlib_corpus()
    size = task.cfg['seq_len'] + 1
    assert sum(task.num_examples(s) for s in SPLITS) == len(corpus) // size
    aligned = {corpus[k:k + size] for k in range(0, len(corpus) - size + 1, size)}
    for split in SPLITS:
        for i in range(0, task.num_examples(split), max(1, task.num_examples(split) // 40)):
            ex = task.example(split, i)
            assert chunk_bytes(ex) in aligned  # a non-overlapping chunk, verbatim
            np.testing.assert_array_equal(ex['weights'], 1.0)


def test_named_files_glob_and_tuple(tmp_path):
    a = write_text(tmp_path / 'a.txt', 0)
    b = write_text(tmp_path / 'b.txt', 1)
    (tmp_path / 'sub').mkdir()
    c = write_text(tmp_path / 'sub' / 'c.md', 2)
    by_glob = build(files=str(tmp_path / '*.txt'), seq_len=32)
    corpus = a + b'\n' + b
    assert sum(by_glob.num_examples(s) for s in SPLITS) == len(corpus) // 33
    by_tuple = build(files=(str(tmp_path / '*.txt'), str(tmp_path / '**' / '*.md')), seq_len=32)
    corpus3 = a + b'\n' + b + b'\n' + c
    assert sum(by_tuple.num_examples(s) for s in SPLITS) == len(corpus3) // 33
    texts = {}
    for split in SPLITS:
        texts[split] = {chunk_bytes(by_tuple.example(split, i)) for i in range(by_tuple.num_examples(split))}
        assert all(t in corpus3 for t in list(texts[split])[:100])
    assert not texts['train'] & texts['eval'] and not texts['eval'] & texts['test']
    assert not texts['train'] & texts['test']


def test_rebuilding_without_the_cache_gives_the_same_examples(tmp_path):
    write_text(tmp_path / 'a.txt', 3)
    first = build(files=str(tmp_path / 'a.txt'), seq_len=16)
    ex = [first.example(s, 5) for s in SPLITS]
    text_lm._CACHE.clear()
    again = build(files=str(tmp_path / 'a.txt'), seq_len=16)
    for s, e in zip(SPLITS, ex):
        np.testing.assert_array_equal(again.example(s, 5)['inputs'], e['inputs'])


def test_chance_is_the_most_frequent_byte():
    task = build()
    counts = np.zeros(256, np.int64)
    for i in range(500):
        counts += np.bincount(task.example('train', i)['targets'], minlength=256)
    guess = int(np.argmax(counts))
    hits = [np.mean(task.example('eval', i)['targets'] == guess) for i in range(500)]
    assert abs(np.mean(hits) - task.chance()['accuracy']) < 0.03


def bad(tmp_path, kind):
    if kind == 'missing':
        return str(tmp_path / 'nope.txt')
    if kind == 'no_match':
        return str(tmp_path / '*.nothing')
    if kind == 'directory':
        return str(tmp_path)
    if kind == 'not_strings':
        return (1, 2)
    path = tmp_path / 'f.txt'
    if kind == 'empty':
        path.write_text('')
    elif kind == 'blank':
        path.write_text('  \n\n')
    elif kind == 'binary':
        path.write_bytes(bytes(range(256)) * 50)
    elif kind == 'too_small':
        path.write_text('just a few words of text\n' * 3)
    return str(path)


@pytest.mark.parametrize('kind', ['missing', 'no_match', 'directory', 'not_strings', 'empty',
                                  'blank', 'binary', 'too_small'])
def test_bad_files_name_task_files(tmp_path, kind):
    with pytest.raises(ConfigError, match=r'^task\.files: ') as err:
        build(files=bad(tmp_path, kind))
    assert '\n' not in str(err.value)


def test_one_bad_file_among_good_ones_is_named(tmp_path):
    write_text(tmp_path / 'good.txt', 4)
    (tmp_path / 'bad.txt').write_bytes(b'\x00' * 100)
    with pytest.raises(ConfigError, match=r"^task\.files: .*bad\.txt.*binary"):
        build(files=str(tmp_path / '*.txt'))
