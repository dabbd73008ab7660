"""Config files, the arg string, overrides, and the errors a user can make."""

import json
import os

import pytest

from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import ConfigError

from conftest import ROOT


def test_parse_arg_keeps_brackets_together():
    assert config_lib.parse_arg('model=lstm,size=small,quick,eval.dependency_lengths=(16,32)') == {
        'model': 'lstm', 'size': 'small', 'quick': True, 'eval.dependency_lengths': '(16,32)'}
    assert config_lib.parse_arg(None) == {}


def test_config_file_arg_and_overrides():
    cfg = config_lib.load(os.path.join(ROOT, 'configs/recall.py') + ':model=lstm,size=mini,quick',
                          {'train.steps': '123', 'optim.learning_rate': '3e-4', 'model.scan_layers': 'true',
                           'eval.dependency_lengths': '(16,32)'})
    assert cfg.model.name == 'lstm' and cfg.model.size == 'mini'
    assert cfg.train.steps == 123 and cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.model.scan_layers is True
    assert cfg.eval.dependency_lengths == (16, 32)
    quick = config_lib.load(os.path.join(ROOT, 'configs/recall.py') + ':quick')
    full = config_lib.load(os.path.join(ROOT, 'configs/recall.py'))
    assert quick.task.seq_len < full.task.seq_len and quick.train.steps != full.train.steps


def test_overrides_go_through_config_flags_and_agree_with_set_field(monkeypatch):
    """`load` is ml_collections' config_flags: patch its parser out and `load` breaks;
    for overrides both readers accept, the result equals applying `set_field`."""
    spec = os.path.join(ROOT, 'configs/listops.py') + ':model=gru,quick'
    overrides = {'model.hidden': '48', 'model.dropout': '0.1', 'mesh.custom_rules': "(('mlp', 'fsdp'),)",
                 'task.files': '/data/lra/*.tsv', 'eval.dependency_lengths': '64', 'train.seed': '3'}
    cfg = config_lib.load(spec, overrides)
    by_hand = config_lib._module(spec.partition(':')[0]).get_config('model=gru,quick')
    for key, value in overrides.items():
        config_lib.set_field(by_hand, key, value)
    assert cfg.to_dict() == by_hand.to_dict() and cfg.is_locked
    assert cfg.task.files == ('/data/lra/*.tsv',) and cfg.eval.dependency_lengths == (64,)

    from ml_collections import config_flags

    def broken(*args, **kwargs):
        raise RuntimeError('config_flags was called')
    monkeypatch.setattr(config_flags, 'DEFINE_config_file', broken)
    with pytest.raises(RuntimeError, match='config_flags was called'):
        config_lib.load(spec)


def test_values_config_flags_refuses_are_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"^config field train.steps='1e3': invalid literal"):
        config_lib.load(os.path.join(ROOT, 'configs/recall.py'), {'train.steps': '1e3'})


def test_unknown_key_names_the_closest_field():
    cfg = config_lib.make_config(None, task='recall')
    with pytest.raises(ConfigError, match=r"unknown config field 'train.stepz'; did you mean 'train.steps'\?"):
        config_lib.set_field(cfg, 'train.stepz', '3')
    with pytest.raises(ConfigError, match="'optim' is a group"):
        config_lib.set_field(cfg, 'optim', '3')


@pytest.mark.parametrize('field,value,expected', [
    ('train.steps', 'abc', 'expected an integer'),
    ('train.steps', '2.5', 'expected an integer'),
    ('model.scan_layers', 'maybe', 'expected true or false'),
    ('optim.learning_rate', 'fast', 'expected a number'),
])
def test_bad_values_say_what_was_expected(field, value, expected):
    cfg = config_lib.make_config(None, task='recall')
    with pytest.raises(ConfigError, match=expected):
        config_lib.set_field(cfg, field, value)


def test_unknown_arg_and_missing_file():
    with pytest.raises(ConfigError, match="config argument 'fast' is not known"):
        config_lib.make_config('fast', task='recall')
    with pytest.raises(ConfigError, match='does not exist'):
        config_lib.load('configs/nope.py')


def test_check_catches_impossible_values():
    cfg = config_lib.make_config(None, task='recall')
    cfg.train.steps = 0
    with pytest.raises(ConfigError, match='train.steps'):
        config_lib.check(cfg)
    cfg = config_lib.make_config('size=huge', task='recall')
    with pytest.raises(ConfigError, match="model.size='huge'"):
        config_lib.check(cfg)


def test_resume_conflicts_ignore_only_resumable_fields():
    a = config_lib.make_config(None, task='recall').to_dict()
    b = json.loads(json.dumps(a))
    b['train']['steps'] += 100
    b['eval']['every_steps'] = 7
    assert config_lib.resume_conflicts(a, b) == []
    b['model']['name'] = 'lstm'
    b['optim']['learning_rate'] = 1.0
    assert config_lib.resume_conflicts(a, b) == ['model.name', 'optim.learning_rate']


def test_size_table_non_embedding_counts_match_comments():
    """The comments in SIZES quote decoder-only non-embedding counts; keep them true."""
    from flaxformer_lite import models, tasks
    spec = tasks.build(tasks.default_config('recall')).spec
    family = models.get('transformer')
    for size, quoted in [('micro', 0.025e6), ('tiny', 0.1e6), ('mini', 0.8e6), ('small', 4.7e6), ('medium', 25e6), ('base', 85e6),
                         ('large', 302e6), ('xl', 680e6), ('1b', 1.2e9)]:
        base = config_lib.base_config('recall').model.to_dict()
        m = family.resolve(base, config_lib.SIZES[size], spec)
        n = family.count_params(m, spec)['non_embedding']
        assert abs(n - quoted) / quoted < 0.06, (size, n)
