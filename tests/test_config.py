"""Config files, the arg string, overrides, and the errors a user can make."""

import json
import os
import subprocess
import sys

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


def test_overrides_are_set_field_on_get_config(monkeypatch):
    """`load` calls the file's get_config and applies each override with `set_field`: the
    same reader as the ARG string's fields; ml_collections' config_flags is not used."""
    from ml_collections import config_flags

    def broken(*args, **kwargs):
        raise RuntimeError('config_flags was called')
    monkeypatch.setattr(config_flags, 'DEFINE_config_file', broken)
    spec = os.path.join(ROOT, 'configs/listops.py') + ':model=gru,quick'
    overrides = {'model.hidden': '48', 'model.dropout': '0.1', 'mesh.custom_rules': "(('mlp', 'fsdp'),)",
                 'task.files': '/data/lra/*.tsv', 'eval.dependency_lengths': '64', 'train.seed': '3'}
    cfg = config_lib.load(spec, overrides)
    by_hand = config_lib._module(spec.partition(':')[0]).get_config('model=gru,quick')
    for key, value in overrides.items():
        config_lib.set_field(by_hand, key, value)
    assert cfg.to_dict() == by_hand.to_dict() and cfg.is_locked
    assert cfg.task.files == ('/data/lra/*.tsv',) and cfg.eval.dependency_lengths == (64,)
    assert cfg.mesh.custom_rules == (('mlp', 'fsdp'),)


# (field, command-line string, value): every form as config_flags read a --config.a.b=v
# flag, which the ARG string's fields now read the same way.
FORMS = [
    ('train.steps', '123', 123), ('train.steps', '0x10', 16), ('train.steps', 'none', None),
    ('train.steps', 'None', None), ('eval.batch_size', 'null', None),
    ('optim.learning_rate', '3e-4', 3e-4), ('optim.learning_rate', '2', 2.0), ('model.dropout', 'none', None),
    ('model.scan_layers', 'true', True), ('model.scan_layers', 'False', False), ('model.scan_layers', 't', True),
    ('model.scan_layers', '0', False), ('model.scan_layers', 'none', None),
    ('model.pos_encoding', 'none', 'none'),  # a string field keeps the word: no positions, not unset
    ('model.la_decay', 'none', 'none'), ('train.init_from', "'runs/a b'", "'runs/a b'"),
    ('eval.dependency_lengths', '(16,32)', (16, 32)), ('eval.dependency_lengths', '[16, 32]', (16, 32)),
    ('eval.dependency_lengths', '16,32', (16, 32)), ('eval.dependency_lengths', '64', (64,)),
    ('eval.dependency_lengths', '()', ()), ('train.freeze', 'head', ('head',)),
    ('train.freeze', "('head', 'embed')", ('head', 'embed')), ('train.freeze', "'a b'", ('a b',)),
    ('train.freeze', 'none', ('none',)), ('train.freeze', 'True', (True,)),
    ('train.init_map', 'decoder:encoder', ('decoder:encoder',)), ('task.files', '/data/*.tsv', ('/data/*.tsv',)),
    ('mesh.custom_rules', "(('mlp', None),)", (('mlp', None),)),
]


@pytest.mark.parametrize('field,raw,value', FORMS, ids=[f'{f}={r}' for f, r, _ in FORMS])
def test_override_forms_read_as_config_flags_read_them(field, raw, value):
    cfg = config_lib.load(os.path.join(ROOT, 'configs/listops.py'), {field: raw})
    got = cfg
    for part in field.split('.'):
        got = got[part]
    assert got == value and type(got) is type(value), (got, value)
    if config_lib.parse_arg(f'{field}={raw}') == {field: raw}:  # the same string in the ARG string
        assert config_lib.flatten(config_lib.make_config(f'{field}={raw}', task='listops').to_dict())[field] == got


@pytest.mark.parametrize('field,raw,says', [
    ('train.steps', '1e3', "^config field train.steps='1e3': expected an integer$"),
    ('train.steps', '2.0', "^config field train.steps='2.0': expected an integer$"),
    ('model.scan_layers', 'maybe', "^config field model.scan_layers='maybe': expected true or false$"),
    ('train.freeze', 'a b', r"^config field train.freeze='a b': expected a tuple such as \(16,32\); quote elements"),
    ('model', 'big', "^config field 'model' is a group; set one of its fields"),
    ('train.stepz', '3', r"^unknown config field 'train.stepz'; did you mean 'train.steps'\?$"),
])
def test_a_bad_override_is_one_line_naming_the_field(field, raw, says):
    with pytest.raises(ConfigError, match=says) as e:
        config_lib.load(os.path.join(ROOT, 'configs/recall.py'), {field: raw})
    assert '\n' not in str(e.value)


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


# The `model` namespace every run's config.json holds: (default, field type). Families
# declare their fields in models/knobs.py; the namespace they assemble must stay this one,
# so that a saved run resumes.
MODEL_FIELDS = dict(
    arch=('auto', str), attention_block_size=(128, int), attention_dropout=(0.0, float),
    attention_impl=('einsum', str), bidirectional=(False, bool), chunk_size=(16, int), d_ff=(None, int),
    d_model=(None, int), dropout=(None, float), dtype=('float32', str), encoder_layers=(None, int), ffn=(None, str),
    hidden=(None, int), la_decay=('none', str), la_feature_map=('elu', str), max_len=(None, int),
    mingru_expand=(1, int), mlp_expand=(None, int), name=('transformer', str), norm=('layernorm', str),
    norm_position=(None, str), num_heads=(None, int), num_kv_heads=(None, int), num_layers=(None, int),
    pooling=('mean', str), pos_encoding=(None, str), remat=('none', str), residual=(False, bool),
    rnn_attention=('none', str), scale_embeddings=(True, bool), scan_layers=(None, bool),
    share_embeddings=(True, bool), size=('tiny', str), ssm_conv=(4, int), ssm_expand=(2, int), ssm_state=(16, int),
    unroll=(1, int), width_multiple=(None, int))


def test_the_model_namespace_assembled_from_the_families_is_the_saved_one():
    from flaxformer_lite import tasks
    for task in tasks.REGISTRY:
        cfg = config_lib.base_config(task)
        got = {k: (cfg.model[k], cfg.model.get_type(k)) for k in cfg.model.keys()}
        assert got == MODEL_FIELDS, task
        assert all(type(cfg.model[k]) is type(v) for k, (v, _) in MODEL_FIELDS.items()), task
        assert json.loads(config_lib.to_json(cfg))['model'] == {k: v for k, (v, _) in MODEL_FIELDS.items()}


def test_every_family_declares_its_knobs():
    from flaxformer_lite import models
    from flaxformer_lite.models import knobs
    assert set(knobs.BY_FAMILY) == set(models.REGISTRY)
    own = {k for blocks in knobs.BY_FAMILY.values() for block in blocks for k in block}
    assert own.isdisjoint(knobs.SHARED) and set(knobs.declared()) == set(knobs.SHARED) | own


def test_reading_a_config_imports_no_jax():
    """A sweep refuses a bad trial before jax is imported: configs never import the models."""
    code = ('import sys; from flaxformer_lite import config; config.load("configs/recall.py:model=mingru", '
            '{"model.la_decay": "gated"}); bad = [m for m in sys.modules if m.split(".")[0] in ("jax", "flax")]; '
            'assert not bad, bad')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# Widths that are a multiple of 4 or 2 because no multiple of 8 lands within 6% of the
# Transformer's count (recurrent_family.AUTO_MULTIPLES).
SMALL_WIDTHS = {('gru', 'micro'): 46, ('gru', 'tiny'): 92, ('mamba', 'micro'): 36, ('mingru', 'micro'): 36}


def test_every_family_and_size_resolves_to_a_multiple_of_8_but_at_small_widths():
    """With model.width_multiple unset, every matched width shards over 8 devices, except
    the listed small ones; from `tiny` on every one shards over 4."""
    from flaxformer_lite import models, tasks
    spec = tasks.build(tasks.default_config('recall')).spec  # a language model
    for name, family in models.REGISTRY.items():
        for size, row in config_lib.SIZES.items():
            model = {**config_lib.base_config('recall').model.to_dict(), 'name': name, 'size': size}
            width = family.resolve(model, row, spec)[family.width_field]
            assert width == SMALL_WIDTHS.get((name, size), width) and width % 2 == 0, (name, size, width)
            assert width % (8 if (name, size) not in SMALL_WIDTHS else 4 if size != 'micro' else 2) == 0
