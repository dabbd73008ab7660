"""Contract tests every registered task must pass: determinism, disjoint splits, shapes
and dtypes that match the spec, decode, tight `min_seq_len`, length generalisation,
and the registry API. Task-specific solvers and chance measurements live in
tests/test_tasks_<family>.py.
"""

import hashlib
import pickle
import time

import ml_collections
import numpy as np
import pytest

from flaxformer_lite import tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS, split_of

NAMES = sorted(tasks.REGISTRY)
FILE_BACKED = {'text_lm'}  # examples come from a corpus, not from the seed
EXPECTED = {'recall', 'copy', 'selective_copy', 'mqar', 'adding', 'listops', 'agreement',
            'parity', 'dyck', 'induction', 'text_lm', 'seq2seq'}


def build(name, **over):
    return tasks.build(dict(tasks.default_config(name).to_dict(), **over))


def content(ex):
    h = hashlib.blake2b(digest_size=16)
    for key in ('inputs', 'targets', 'weights'):
        h.update(np.ascontiguousarray(ex[key]).tobytes())
    return h.hexdigest()


def same(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_registry_holds_the_suite():
    assert set(tasks.REGISTRY) == EXPECTED
    for name, cls in tasks.REGISTRY.items():
        assert cls.name == name
        assert 'seq_len' in cls.DEFAULTS, name


def test_unknown_task_name_suggests():
    with pytest.raises(ConfigError, match=r"task.name='lisops'.*listops"):
        tasks.build({'name': 'lisops'})


@pytest.mark.parametrize('name', NAMES)
def test_default_config_is_a_configdict_with_the_knobs(name):
    cfg = tasks.default_config(name)
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.name == name and cfg.seed == 0
    for key in tasks.REGISTRY[name].DEFAULTS:
        assert key in cfg
    task = tasks.build(cfg)  # a ConfigDict is accepted as is
    assert task.cfg['name'] == name


@pytest.mark.parametrize('name', NAMES)
def test_deterministic_in_seed_split_index(name):
    a, b = build(name), build(name)
    for split in SPLITS:
        for i in (0, 1, 7, 2**31 - 2):
            assert same(a.example(split, i), b.example(split, i)), (split, i)
    # Different indices give different examples.
    firsts = {content(a.example('train', i)) for i in range(20)}
    assert len(firsts) == 20
    other = build(name, seed=1)
    differ = [not same(a.example('train', i), other.example('train', i)) for i in range(5)]
    if name in FILE_BACKED:
        assert not any(differ)  # the corpus is the corpus; the seed has nothing to choose
    else:
        assert all(differ)


@pytest.mark.parametrize('name', NAMES)
def test_splits_are_disjoint(name):
    task = build(name)
    seen = {}
    for split in SPLITS:
        hashes = set()
        for i in range(250):
            ex = task.example(split, i)
            assert split_of(ex) == split
            hashes.add(content(ex))
        seen[split] = hashes
    assert not seen['train'] & seen['eval']
    assert not seen['train'] & seen['test']
    assert not seen['eval'] & seen['test']
    assert len(seen['eval']) > 200  # not a tiny space recycled


@pytest.mark.parametrize('name', NAMES)
def test_shapes_dtypes_and_ranges_match_spec(name):
    task = build(name)
    spec = task.spec
    assert spec.kind in ('lm', 'seq2seq', 'classify', 'regress')
    for split in SPLITS:
        for i in range(40):
            ex = task.example(split, i)
            assert set(ex) == {'inputs', 'targets', 'weights'}
            assert ex['inputs'].dtype == np.int32 and ex['inputs'].shape == (spec.input_len,)
            assert ex['weights'].dtype == np.float32
            assert ex['weights'].shape == ex['targets'].shape
            assert set(np.unique(ex['weights'])) <= {0.0, 1.0} and ex['weights'].sum() > 0
            assert 0 <= ex['inputs'].min() and ex['inputs'].max() < spec.vocab_size
            if spec.kind in ('lm', 'seq2seq'):
                assert ex['targets'].dtype == np.int32 and ex['targets'].shape == (spec.target_len,)
                assert ex['targets'].max() < spec.num_outputs and ex['targets'].min() >= 0
            elif spec.kind == 'classify':
                assert ex['targets'].dtype == np.int32 and ex['targets'].shape == ()
                assert 0 <= int(ex['targets']) < spec.num_outputs
            else:
                assert ex['targets'].dtype == np.float32 and ex['targets'].shape == ()
                assert spec.num_outputs == 1
            if spec.kind == 'lm':  # targets[i] is the token after inputs[i]
                np.testing.assert_array_equal(ex['targets'][:-1], ex['inputs'][1:])
                assert np.all(ex['targets'][ex['weights'] > 0] != spec.pad_id)
            if spec.kind == 'seq2seq':
                w = ex['weights']
                n = int(w.sum())
                assert np.all(w[:n] == 1) and np.all(ex['targets'][n:] == spec.pad_id)


@pytest.mark.parametrize('name', NAMES)
def test_decode_gives_two_strings(name):
    task = build(name)
    for i in range(5):
        source, target = task.decode(task.example('eval', i))
        assert isinstance(source, str) and isinstance(target, str) and source and target


@pytest.mark.parametrize('name', NAMES)
def test_chance_is_a_known_metric_in_range(name):
    chance = build(name).chance()
    assert chance and set(chance) <= {'accuracy', 'exact_match', 'mse'}
    for metric, value in chance.items():
        assert value > 0 and (metric == 'mse' or value < 1)


WITH_DEPENDENCY = [n for n in NAMES if 'dependency_length' in tasks.REGISTRY[n].DEFAULTS]


@pytest.mark.parametrize('name', WITH_DEPENDENCY)
def test_min_seq_len_is_tight(name):
    cfg = dict(tasks.default_config(name).to_dict())
    need = tasks.REGISTRY[name].min_seq_len(cfg)
    assert need is not None
    task = tasks.build(dict(cfg, seq_len=need))
    for split in SPLITS:
        task.example(split, 3)
    with pytest.raises(ConfigError, match=r'task\.seq_len'):
        tasks.build(dict(cfg, seq_len=need - 1))


@pytest.mark.parametrize('name', WITH_DEPENDENCY)
def test_with_dependency_length_grows_the_sequence(name):
    task = build(name)
    longer = task.with_dependency_length(3 * task.cfg['dependency_length'])
    assert type(longer) is type(task)
    assert longer.cfg['dependency_length'] == 3 * task.cfg['dependency_length']
    assert longer.cfg['seq_len'] >= type(task).min_seq_len(longer.cfg)
    ex = longer.example('eval', 0)
    assert ex['inputs'].shape == (longer.spec.input_len,)


@pytest.mark.parametrize('name', sorted(set(NAMES) - set(WITH_DEPENDENCY)))
def test_no_dependency_knob_refuses_length_generalisation(name):
    with pytest.raises(ConfigError, match=r'eval\.dependency_lengths'):
        build(name).with_dependency_length(64)


@pytest.mark.parametrize('name', WITH_DEPENDENCY)
def test_negative_dependency_length_is_refused(name):
    with pytest.raises(ConfigError, match=r'task\.dependency_length'):
        build(name, dependency_length=-1)


# recall (the walking skeleton's) relies on the typed ConfigDict to refuse these.
@pytest.mark.parametrize('name', sorted(set(NAMES) - {'recall'}))
def test_non_integer_seq_len_is_refused(name):
    with pytest.raises(ConfigError, match=r'task\.seq_len'):
        tasks.build(dict(tasks.default_config(name).to_dict(), seq_len='long'))


@pytest.mark.parametrize('name', NAMES)
def test_pickles_for_worker_processes(name):
    task = build(name)
    clone = pickle.loads(pickle.dumps(task))
    for split in SPLITS:
        assert same(task.example(split, 11), clone.example(split, 11))


@pytest.mark.parametrize('name', sorted(set(NAMES) - FILE_BACKED))
def test_generation_is_fast(name):
    """Target < 200 us per draw at the defaults; the bound leaves room for a busy machine."""
    task = build(name)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(200):
        task._generate(rng)
    per_draw = (time.perf_counter() - start) / 200
    assert per_draw < 1e-3, f'{per_draw * 1e6:.0f} us per draw'
