"""Pretrain, then fine-tune (train.init_from, init_exclude, init_require, init_map, freeze)
and masked-language modelling: what loads is bit-identical to the source run, what does
not is exactly a fresh initialisation, frozen parameters never move, and the MLM loss
counts the masked positions alone."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compilation_cache, tiny_config  # noqa: F401  (a fixture)

from flaxformer_lite import resolve
from flaxformer_lite.errors import UserError
from flaxformer_lite.tasks.text_lm import MASK, TextLM
from flaxformer_lite.train import checkpoint, losses, transfer
from flaxformer_lite.train.loop import train_and_evaluate
from flaxformer_lite.train.setup import build

pytestmark = pytest.mark.xdist_group('transfer')  # the pretraining runs, once

FAST = dict(train__steps=4, eval__every_steps=4, checkpoint__every_steps=4, train__log_every=2,
            optim__warmup_steps=1, eval__num_examples=16)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """~12 KB of text: enough 17-byte chunks for every split."""
    path = tmp_path_factory.mktemp('corpus') / 'text.txt'
    rng = np.random.default_rng(0)
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran', 'far', 'away', 'then', 'slept']
    path.write_text(' '.join(rng.choice(words, 2500)))
    return str(path)


@pytest.fixture(scope='module')
def pretrained(corpus, tmp_path_factory, compilation_cache):
    """(model, objective) -> (workdir, host parameters) of one short pretraining run each,
    trained on first use and shared by the tests of this module."""
    runs = {}

    def get(model, objective='lm'):
        if (model, objective) not in runs:
            workdir = str(tmp_path_factory.mktemp('pretrained') / f'{model}_{objective}')
            exp = resolve.from_config(_lm_config(model, corpus, task__objective=objective))
            train_and_evaluate(exp, workdir, verbose=False)
            runs[model, objective] = workdir, _params(exp, workdir)
        return runs[model, objective]
    return get


def _lm_config(model, corpus, **more):
    return tiny_config('text_lm', model, task__seq_len=16, task__files=corpus, **{**FAST, **more})


def _classifier_config(model, arch, **more):
    return tiny_config('agreement', model, task__dependency_length=3, task__seq_len=8, model__arch=arch,
                       model__pooling='last', **{**FAST, **more})


def _params(exp, workdir):
    """The parameters of the latest checkpoint of `workdir`, as host arrays by path."""
    setup = build(exp)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, async_save=False, read_only=True)
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            _, state, _, _ = ckpt.restore_latest(setup.abstract_state)
    finally:
        ckpt.close()
    return {k: np.asarray(v) for k, v in transfer.flat_paths(jax.device_get(state.params)).items()}


def _start(cfg):
    """(fresh parameters, parameters after train.init_from) of a run's first start."""
    exp = resolve.from_config(cfg)
    setup = build(exp)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        fresh = setup.init_state().params  # as the trainer starts it
        plan = transfer.plan(exp.config, setup.abstract_state.params, exp.model_cfg)
        loaded = transfer.load(plan, fresh)
    as_np = lambda tree: {k: np.asarray(v) for k, v in transfer.flat_paths(jax.device_get(tree)).items()}  # noqa: E731
    return as_np(fresh), as_np(loaded), plan


@pytest.mark.parametrize('model,source_objective,arch,stack', [
    ('transformer', 'lm', 'decoder_classifier', 'decoder'),  # GPT-style
    ('transformer', 'mlm', 'encoder_classifier', 'encoder'),  # BERT-style
    ('lstm', 'lm', 'decoder_classifier', 'stack'),
])
def test_a_pretrained_stack_loads_bit_identical_and_the_new_head_is_fresh(model, source_objective, arch, stack,
                                                                       pretrained):
    source, src = pretrained(model, source_objective)
    fresh, loaded, plan = _start(_classifier_config(model, arch, train__init_from=source))
    stack_paths = [p for p in fresh if p.split('/')[0] == stack]
    assert stack_paths and all(p in dict(plan.loaded) for p in stack_paths)  # every block parameter loads
    for here, there in plan.loaded:
        np.testing.assert_array_equal(loaded[here], src[there])
        assert not np.array_equal(loaded[here], fresh[here]) or np.all(fresh[here] == src[there])
    fresh_paths = {p for p, _ in plan.fresh}
    assert {p for p in fresh if p.startswith('head/')} <= fresh_paths  # the classifier head ...
    assert 'embed/embedding' in fresh_paths  # ... and the table of the other vocabulary
    for path in fresh_paths:
        np.testing.assert_array_equal(loaded[path], fresh[path])  # exactly a fresh initialisation


def test_exclude_map_and_require(pretrained):
    source, _ = pretrained('transformer')
    _, _, plan = _start(_classifier_config('transformer', 'decoder_classifier', train__init_from=source,
                                           train__init_exclude=('decoder/layer_1',)))
    assert any(p.startswith('decoder/layer_1/') and why == 'train.init_exclude' for p, why in plan.fresh)
    assert all(not p.startswith('decoder/layer_1/') for p, _ in plan.loaded)
    # A causal stack goes into an encoder only when asked.
    with pytest.raises(UserError, match='train.init_map=decoder:encoder'):
        _start(_classifier_config('transformer', 'encoder_classifier', train__init_from=source))
    _, _, plan = _start(_classifier_config('transformer', 'encoder_classifier', train__init_from=source,
                                           train__init_map=('decoder:encoder',)))
    assert ('encoder/layer_0/mlp/wi/kernel', 'decoder/layer_0/mlp/wi/kernel') in plan.loaded
    with pytest.raises(UserError, match=r'train.init_require: embed/embedding cannot load .*shape \(256, 32\)'):
        _start(_classifier_config('transformer', 'decoder_classifier', train__init_from=source,
                                  train__init_require=('embed',)))
    with pytest.raises(UserError, match="is a transformer run and this one is model.name=lstm"):
        _start(_classifier_config('lstm', 'decoder_classifier', train__init_from=source))


def test_frozen_parameters_do_not_change_and_results_say_where_the_weights_came_from(pretrained, tmp_path):
    (source, src), tuned = pretrained('transformer'), str(tmp_path / 'probe')
    cfg = _classifier_config('transformer', 'decoder_classifier', train__init_from=source,
                             train__freeze=('decoder', 'embed'), train__steps=6, optim__learning_rate=1e-2)
    exp = resolve.from_config(cfg)
    fresh, _, _ = _start(cfg)
    train_and_evaluate(exp, tuned, verbose=False)
    after = _params(exp, tuned)
    for path, value in after.items():
        if path.startswith('decoder/'):
            np.testing.assert_array_equal(value, src[path])  # frozen and loaded: the source's, exactly
        elif path.startswith('embed/'):
            np.testing.assert_array_equal(value, fresh[path])  # frozen and fresh: its initial value
        else:
            assert not np.array_equal(value, fresh[path]), path  # the head trained
    with open(os.path.join(tuned, 'results.json')) as f:
        record = json.load(f)['init_from']
    assert record['from'] == os.path.abspath(source) and record['step'] == 4
    assert record['loaded'] == sum(p.startswith('decoder/') for p in after)
    assert 'head/kernel' in record['fresh']


def test_masking_follows_bert_and_the_loss_counts_masked_positions_only(corpus):
    task = TextLM(dict(seq_len=64, files=corpus, objective='mlm', mask_rate=0.15, seed=0))
    assert task.spec.kind == 'mlm' and task.spec.vocab_size == MASK + 1
    masked = swapped = kept = 0
    for i in range(300):
        ex = task.example('train', i)
        chosen = ex['weights'] > 0
        assert chosen.sum() == round(0.15 * 64)
        assert np.array_equal(ex['inputs'][~chosen], ex['targets'][~chosen])  # the rest is untouched
        masked += (ex['inputs'][chosen] == MASK).sum()
        kept += (ex['inputs'][chosen] == ex['targets'][chosen]).sum()
        swapped += ((ex['inputs'][chosen] != MASK) & (ex['inputs'][chosen] != ex['targets'][chosen])).sum()
    total = masked + swapped + kept
    assert abs(masked / total - 0.8) < 0.03 and abs(swapped / total - 0.1) < 0.03 and abs(kept / total - 0.1) < 0.03
    # Evaluation examples are the same every time; a training example is masked anew each pass.
    np.testing.assert_array_equal(task.example('eval', 3)['weights'], task.example('eval', 3)['weights'])
    n = task.num_examples('train')
    assert not np.array_equal(task.example('train', 3)['weights'], task.example('train', 3 + n)['weights'])
    batch = {k: jnp.asarray(np.stack([task.example('train', i)[k] for i in range(4)])) for k in
             ('inputs', 'targets', 'weights')}
    logits = jax.random.normal(jax.random.key(0), (4, 64, MASK + 1))
    loss, sums = losses.metric_sums(logits, batch, 'mlm')
    unmasked = (batch['weights'] == 0)[..., None]
    loss2, sums2 = losses.metric_sums(jnp.where(unmasked, 50.0 * logits, logits), batch, 'mlm')
    assert float(loss2) == float(loss) and float(sums['weight']) == 4 * round(0.15 * 64)
    loss3, _ = losses.metric_sums(jnp.where(unmasked, logits, 50.0 * logits), batch, 'mlm')
    assert float(loss3) != float(loss)
