"""muP (optim.parametrization=mup, models/mup.py): at its base width it is the standard
parametrisation bit for bit; away from it hidden matrices move at base_width / width of
the rate and everything else at the rate, the readout and attention scale as muP says,
the roles by name agree with microsoft/mup's rule by shapes, and the coordinate check
is flat in width under mup where it grows under sp."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lite import resolve
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.models import mup
from flaxformer_lite.models.attention import MultiHeadAttention
from flaxformer_lite.models.embeddings import Embed
from flaxformer_lite.train import optimizer, setup as setup_lib, step as step_lib

from conftest import ROOT, tiny_config

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import coord_check  # noqa: E402

# One of each family (its mixer's options that add parameters switched on), width 32; the
# fixed-state families in the full suite only (each compiles a few seconds' worth).
_slow = pytest.mark.slow
ONE_OF_EACH = [
    ('transformer', {}),
    ('lstm', {'model__hidden': 32, 'model__share_embeddings': False}),
    ('mamba', {'model__hidden': 32}),
    ('linear_attention', {'model__hidden': 32, 'model__la_decay': 'gated'}),
    ('mingru', {'model__hidden': 32, 'model__mingru_expand': 2}),
]
FAMILIES = [pytest.param(n, e, marks=() if n in ('transformer', 'lstm') else _slow) for n, e in ONE_OF_EACH]
IDS = [n for n, _ in ONE_OF_EACH]
OPTIM = {'optim__weight_decay': 0.1, 'optim__learning_rate': 1e-2, 'optim__warmup_steps': 2}


def _batch(exp, n=8):
    examples = [exp.task.example('train', i) for i in range(n)]
    return {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}


def _train(cfg, steps=4):
    """Losses of `steps` train steps on one batch, and the parameters after them."""
    exp = resolve.from_config(cfg)
    s = setup_lib.build(exp)
    state = s.init_state()
    train_step = jax.jit(step_lib.make_train_step(s.model, s.tx, s.lr, exp.spec.kind, label_smoothing=0.0, seed=0))
    batch, losses = _batch(exp), []
    for _ in range(steps):
        state, metrics = train_step(state, batch, s.step_inputs())
        losses.append(float(metrics['objective']))
    return np.array(losses), state.params


@pytest.mark.parametrize('name,extra', FAMILIES, ids=IDS)
def test_mup_at_its_base_width_is_sp_bit_for_bit(name, extra):
    """Every multiplier is exactly 1 there and skipped, so the losses of four steps (with
    weight decay, warmup and clipping; three updates) and the parameters after them are
    identical to the bit."""
    sp_losses, sp_params = _train(tiny_config(model=name, **extra, **OPTIM))
    mup_losses, mup_params = _train(tiny_config(model=name, **extra, **OPTIM, optim__parametrization='mup',
                                                optim__base_width=32))
    np.testing.assert_array_equal(mup_losses, sp_losses)
    assert len(set(sp_losses.tolist())) >= 3 and sp_losses[-1] < sp_losses[0]  # it trained
    jax.tree.map(np.testing.assert_array_equal, mup_params, sp_params)


def _params(cfg):
    exp = resolve.from_config(cfg)
    model = exp.family.build(exp.model_cfg, exp.spec)
    return exp, nn.unbox(jax.jit(model.init)(jax.random.key(0), _batch(exp, 1))['params'])


def _first_update(tx, grads, params):
    """One update from a fresh optimizer state, compiled once (op by op takes seconds)."""
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


@pytest.mark.parametrize('name,extra', FAMILIES, ids=IDS)
def test_hidden_matrices_move_at_base_over_width_and_decay_does_not(name, extra):
    """At width 32 with base 8, one AdamW update from the same gradients: hidden matrices'
    Adam steps are 1/4 of sp's, every other parameter's equal; with zero gradients (only
    the decay moves them) sp and mup move every parameter alike."""
    optim = {**OPTIM, 'optim__warmup_steps': 0, 'optim__grad_clip': 0.0}
    exp, params = _params(tiny_config(model=name, **extra, **optim, optim__parametrization='mup',
                                      optim__base_width=8))
    width = exp.model_cfg[exp.family.width_field]
    assert width == 32 and exp.model_cfg['mup_base_width'] == 8
    sp_optim = {**exp.config.optim.to_dict(), 'parametrization': 'sp'}
    tx_sp, _ = optimizer.make(sp_optim, 10)
    tx_mup, _ = optimizer.make(exp.config.optim, 10, width=width)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    no_decay = {**sp_optim, 'weight_decay': 0.0}
    u_sp = _first_update(optimizer.make(no_decay, 10)[0], grads, params)
    u_mup = _first_update(optimizer.make({**no_decay, 'parametrization': 'mup'}, 10, width=width)[0], grads, params)
    multipliers = optimizer.lr_multipliers(params, 8 / 32)
    hidden = 0
    for (path, a), b, m in zip(jax.tree_util.tree_flatten_with_path(u_mup)[0], jax.tree.leaves(u_sp),
                               jax.tree.leaves(multipliers)):
        assert m == (0.25 if optimizer.is_hidden(path) else 1.0)
        hidden += m != 1.0
        np.testing.assert_allclose(a, b * m, rtol=1e-6, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    assert hidden >= 4
    zeros = jax.tree.map(jnp.zeros_like, params)
    d_sp, d_mup = _first_update(tx_sp, zeros, params), _first_update(tx_mup, zeros, params)
    jax.tree.map(np.testing.assert_array_equal, d_mup, d_sp)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(d_sp))  # the decay is there


def test_multipliers_are_one_at_the_base_width():
    _, params = _params(tiny_config())
    assert set(jax.tree.leaves(optimizer.lr_multipliers(params, 32 / 32))) == {1.0}
    assert mup.readout_multiplier(32, 32) == mup.query_multiplier(32, 32) == 1.0 and mup.embed_width(32, 32) == 32
    assert (mup.readout_multiplier(32, None), mup.query_multiplier(32, None), mup.embed_width(32, None)) == (1.0, 1.0, 32)


def test_a_parameter_of_unknown_role_is_refused():
    with pytest.raises(ValueError, match="add 'gain' to HIDDEN or BASE_RATE"):
        optimizer.lr_multipliers({'layer': {'gain': jnp.ones((3, 3))}}, 0.5)


# Every kind of parameter, in its shapes: the roles by name against microsoft/mup's rule.
SHAPE_VARIANTS = ONE_OF_EACH + [
    ('transformer', {'model__ffn': 'swiglu', 'model__pos_encoding': 'learned', 'model__scan_layers': True}),
    ('gru', {'model__hidden': 32}), ('rnn', {'model__hidden': 32}),
    ('linear_attention', {'model__hidden': 32, 'model__la_feature_map': 'identity', 'model__la_decay': 'fixed'}),
]
SHAPE_TASKS = {'transformer': ['recall', 'seq2seq', 'listops'], 'gru': ['seq2seq'], 'rnn': ['listops']}
# The one documented exception: GLA's rank-16 gate_down maps the width to a fixed 16 (an
# "output" weight of Tensor Programs V's Table 3, whose Adam rate is the hidden one).
OUTPUT_LIKE_HIDDEN = {'gate_down'}


def _shapes(task, name, extra, width):
    widths = {'model__d_model': width, 'model__d_ff': 2 * width} if name == 'transformer' else {'model__hidden': width}
    cfg = tiny_config(task=task, model=name, **{**extra, **widths})
    exp = resolve.from_config(cfg)
    model = exp.family.build(exp.model_cfg, exp.spec)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _batch(exp, 1)))['params']
    return jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))[0]


@pytest.mark.parametrize('name,extra', SHAPE_VARIANTS, ids=[f'{n}-{i}' for i, (n, _) in enumerate(SHAPE_VARIANTS)])
def test_hidden_by_name_is_mups_two_growing_dimensions(name, extra):
    """microsoft/mup's `set_base_shapes` calls a dimension infinite when it differs between
    two widths, and MuAdam scales the rate of a parameter with two infinite dimensions.
    The names in train/optimizer.py must say the same of every parameter (here: widths 32
    and 64, the Transformer with a fixed head count, seq2seq with Bahdanau attention)."""
    for task in SHAPE_TASKS.get(name, ['recall']):
        more = {'model__rnn_attention': 'bahdanau'} if task == 'seq2seq' and name == 'gru' else {}
        small, large = (_shapes(task, name, {**extra, **more}, w) for w in (32, 64))
        assert len(small) == len(large)
        for (path, a), (_, b) in zip(small, large):
            infinite = sum(x != y for x, y in zip(a.shape, b.shape))
            module = getattr(path[-2], 'key', None) if len(path) > 1 else None
            expected = infinite >= 2 or module in OUTPUT_LIKE_HIDDEN
            assert optimizer.is_hidden(path) == expected, (task, jax.tree_util.keystr(path), a.shape, b.shape)


# --- the forward multipliers --------------------------------------------------------------------
def test_embedding_init_and_multiplier_use_the_base_width():
    tokens = jnp.arange(50)[None]
    for scale_width, width in ((None, 64), (16, 16)):
        embed = Embed(50, 64, scale=True, scale_width=scale_width)
        params = embed.init(jax.random.key(0), tokens)
        table = nn.unbox(params)['params']['embedding']
        assert abs(float(table.std()) * width ** 0.5 - 1.0) < 0.05
        np.testing.assert_allclose(embed.apply(params, tokens)[0], table * np.sqrt(width), rtol=1e-6)


def test_attention_logits_scale_as_sqrt_base_head_dim_over_head_dim():
    """With d_head = 32 and a base head dimension of 8: softmax(q.k * sqrt(8) / 32)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    mult = mup.query_multiplier(64, 16)  # base d_model 16, 2 heads: base head dimension 8
    attn = MultiHeadAttention(num_heads=2, num_kv_heads=2, head_dim=32, d_model=64, query_multiplier=mult)
    params = attn.init(jax.random.key(0), x)
    p = nn.unbox(params)['params']
    q, k, v = (jnp.einsum('btd,dhk->bthk', x, p[n]['kernel']) + p[n]['bias'] for n in ('query', 'key', 'value'))
    weights = jax.nn.softmax(jnp.einsum('bthk,bshk->bhts', q, k) * np.sqrt(8) / 32, axis=-1)
    ref = jnp.einsum('bhts,bshk,hkd->btd', weights, v, p['out']['kernel']) + p['out']['bias']
    np.testing.assert_allclose(attn.apply(params, x), ref, rtol=2e-5, atol=2e-6)
    for impl in ('xla', 'blockwise'):
        other = MultiHeadAttention(num_heads=2, num_kv_heads=2, head_dim=32, d_model=64, query_multiplier=mult,
                                   impl=impl, block_size=2)
        np.testing.assert_allclose(other.apply(params, x), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('name,task,extra', [
    ('mingru', 'recall', {}), ('mingru', 'recall', {'model__share_embeddings': False}),
    ('lstm', 'recall', {}), ('lstm', 'listops', {}), ('transformer', 'listops', {}),
], ids=['mingru-tied', 'mingru-head', 'lstm-tied', 'lstm-classifier', 'transformer-classifier'])
def test_readout_is_multiplied_by_base_over_width(name, task, extra):
    """The same parameters under sp and under mup (base 8, width 32, unscaled embeddings so
    that the readout is the only difference): logits_mup = logits_sp / 4 (heads' biases
    are zero at initialisation). The Transformer's attention differs too, so there the
    head is checked on the stack's own (pooled) output."""
    field = 'model__d_model' if name == 'transformer' else 'model__hidden'
    fields = {**extra, field: 32, 'model__scale_embeddings': False}
    exp_sp, params = _params(tiny_config(task=task, model=name, **fields))
    exp_mup = resolve.from_config(tiny_config(task=task, model=name, **fields, optim__parametrization='mup',
                                             optim__base_width=8))
    batch = _batch(exp_sp, 4)
    model = exp_mup.family.build(exp_mup.model_cfg, exp_mup.spec)
    if name == 'transformer':
        from flaxformer_lite.models.transformer import pool
        logits, state = model.apply({'params': params}, batch, capture_intermediates=lambda m, _: m.name == 'encoder',
                                    mutable=['intermediates'])
        features = state['intermediates']['encoder']['__call__'][0]
        pooled = pool(features, batch['inputs'] != exp_mup.spec.pad_id, 'mean')
        expected = (pooled / 4) @ params['head']['kernel'] + params['head']['bias']
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
        return
    sp = exp_sp.family.build(exp_sp.model_cfg, exp_sp.spec).apply({'params': params}, batch)
    np.testing.assert_allclose(model.apply({'params': params}, batch), sp / 4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['transformer', pytest.param('lstm', marks=_slow), pytest.param('mamba', marks=_slow)])
def test_decoding_under_mup_equals_the_full_pass(name):
    """The decoder builds its own model from the experiment's model config: muP's
    multipliers reach it (greedy tokens equal the full pass's argmax)."""
    from flaxformer_lite.models import decoding
    field = 'model__d_model' if name == 'transformer' else 'model__hidden'
    exp, params = _params(tiny_config(model=name, **{field: 32}, optim__parametrization='mup', optim__base_width=8))
    fns = exp.family.decoder(exp.model_cfg, exp.spec)
    model = exp.family.build(exp.model_cfg, exp.spec)
    batch = _batch(exp, 2)
    greedy = decoding.greedy(fns, params, batch, length=6, bos_id=exp.spec.bos_id)
    fed = jnp.concatenate([jnp.full((2, 1), exp.spec.bos_id, jnp.int32), greedy[:, :-1]], axis=1)
    full = model.apply({'params': params}, {'inputs': fed})
    np.testing.assert_array_equal(full.argmax(-1), greedy)


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize('fields,says', [
    ({'optim__parametrization': 'mu'}, "optim.parametrization='mu' is not one of sp, mup; did you mean 'mup'?"),
    ({'optim__parametrization': 'mup'}, 'optim.parametrization=mup needs optim.base_width'),
    ({'optim__parametrization': 'mup', 'optim__base_width': 0}, 'optim.base_width=0 must be a positive integer'),
    ({'optim__base_width': -8}, 'optim.base_width=-8 must be a positive integer'),
    ({'optim__parametrization': 'mup', 'optim__base_width': 64},
     'optim.base_width=64 is larger than the width of this model (model.d_model=32)'),
    ({'model__name': 'lstm', 'model__hidden': 24, 'optim__parametrization': 'mup', 'optim__base_width': 32},
     'optim.base_width=32 is larger than the width of this model (model.hidden=24)'),
], ids=['unknown', 'no_base', 'zero_base', 'negative_base', 'base_above_d_model', 'base_above_hidden'])
def test_config_errors_name_the_field_and_the_fix(fields, says):
    fields = dict(fields)
    model = fields.pop('model__name', 'transformer')
    with pytest.raises(ConfigError) as e:
        resolve.from_config(tiny_config(model=model, **fields))
    assert says in str(e.value) and '\n' not in str(e.value)


def test_sp_ignores_a_base_width():
    exp = resolve.from_config(tiny_config(optim__base_width=8))
    assert 'mup_base_width' not in exp.model_cfg


# --- the coordinate check ------------------------------------------------------------------------
@pytest.mark.slow  # four widths, both parametrisations
def test_coordinate_check_is_flat_in_width_under_mup_and_grows_under_sp(capsys):
    """Widths 16, 32, 64, 128 of a 2-layer Transformer, 4 Adam steps at 1e-2 on one batch.
    mup: every layer's output and the logits within a factor 2 between x8 and x1; the
    attention logits start at O(1/sqrt(width)) under muP's 1/d (microsoft/mup's README:
    transient) so they are only held not to grow. sp: the logits and every layer's
    attention and feed-forward outputs grow by more than 2.5x (x8)."""
    widths = [16 * k for k in coord_check.MULTIPLES]
    results = {p: coord_check.coord_check('transformer', p, base=16, steps=4, learning_rate=1e-2)
               for p in ('sp', 'mup')}
    with capsys.disabled():
        for p, rows in results.items():
            print('\n' + coord_check.table(rows, widths, f'{p}: mean |activation| after 4 Adam steps'))
    for row, values in results['mup'].items():
        growth = values[-1] / values[0]
        if 'attn_logits' in row:
            assert growth < 2.0, (row, values)
        else:
            assert 0.5 < growth < 2.0, (row, values)
    for row, values in results['sp'].items():
        if row == 'logits' or row.endswith(('.attn', '.mlp')):
            assert values[-1] / values[0] > 2.5, (row, values)
