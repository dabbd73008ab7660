"""The grain pipeline: determinism, exact iterator restore, per-host shards, eval padding."""

import numpy as np

from flaxformer_lite import data, tasks


def _task():
    return tasks.build(dict(tasks.default_config('recall').to_dict(), seq_len=32, dependency_length=4))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_state_restores_exactly():
    task = _task()
    it = data.train_iterator(task, batch_size=8, seed=3, threads=2)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    fresh = data.train_iterator(task, batch_size=8, seed=3, threads=2)
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 2)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_seed_changes_order_and_batches_hold_train_examples_only():
    task = _task()
    a = next(data.train_iterator(task, batch_size=8, seed=0))
    b = next(data.train_iterator(task, batch_size=8, seed=1))
    assert not np.array_equal(a['inputs'], b['inputs'])
    for batch in (a, b):
        for inputs, targets in zip(batch['inputs'], batch['targets']):
            assert tasks.split_of({'inputs': inputs, 'targets': targets}) == 'train'


def test_hosts_split_the_global_batch():
    task = _task()
    whole = _take(data.train_iterator(task, batch_size=8, seed=5), 2)
    parts = [_take(data.train_iterator(task, batch_size=8, seed=5, process_index=p, process_count=2), 2)
             for p in range(2)]
    for step in range(2):
        union = np.concatenate([parts[0][step]['inputs'], parts[1][step]['inputs']])
        assert sorted(map(bytes, union)) == sorted(map(bytes, whole[step]['inputs']))
        assert not set(map(bytes, parts[0][step]['inputs'])) & set(map(bytes, parts[1][step]['inputs']))


def test_eval_batches_pad_with_zero_weight():
    task = _task()
    batches = data.eval_batches(task, num_examples=10, batch_size=4)
    assert len(batches) == 3 and all(b['inputs'].shape == (4, 32) for b in batches)
    weights = np.concatenate([b['weights'] for b in batches])
    assert weights[10:].sum() == 0 and weights[:10].sum() > 0
    again = data.eval_batches(task, num_examples=10, batch_size=4)
    np.testing.assert_array_equal(batches[1]['inputs'], again[1]['inputs'])
    halves = [data.eval_batches(task, num_examples=10, batch_size=4, process_index=p, process_count=2)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([halves[0][0]['inputs'], halves[1][0]['inputs']]),
                                  batches[0]['inputs'])
