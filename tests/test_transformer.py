"""The three Transformer shapes: scan == unrolled, cached decoding == full pass, beam
search, analytic counts == real trees, and configs that cannot work."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.models import decoding, transformer_family as tf
from flaxformer_lite.models.family import StepFns
from flaxformer_lite.models.transformer import shift_right
from flaxformer_lite.spec import TaskSpec

LM = TaskSpec(kind='lm', vocab_size=13, input_len=10, target_len=10, num_outputs=13)
S2S = TaskSpec(kind='seq2seq', vocab_size=13, input_len=9, target_len=6, num_outputs=13)
CLS = TaskSpec(kind='classify', vocab_size=13, input_len=10, target_len=1, num_outputs=5)
REG = TaskSpec(kind='regress', vocab_size=13, input_len=10, target_len=1, num_outputs=1)


def model_cfg(spec, **changes):
    m = config_lib.base_config('recall').model.to_dict()
    m.update(num_layers=2, d_model=16, num_heads=4, d_ff=32)
    m.update(changes)
    return tf.resolve(m, config_lib.SIZES['tiny'], spec)


def batch_for(spec, seed=0, b=3):
    r = np.random.default_rng(seed)
    inputs = r.integers(2, spec.vocab_size, size=(b, spec.input_len)).astype(np.int32)
    inputs[0, -3:] = spec.pad_id  # padding in one row
    out = {'inputs': jnp.asarray(inputs)}
    if spec.kind in ('lm', 'seq2seq'):
        out['targets'] = jnp.asarray(r.integers(2, spec.num_outputs, size=(b, spec.target_len)).astype(np.int32))
    return out


def init(m, spec, batch):
    """Plain (unboxed) parameters, as the trainer holds them."""
    return nn.unbox(tf.build(m, spec).init(jax.random.key(0), batch)['params'])


VARIANTS = [
    {},
    dict(pos_encoding='rotary', num_kv_heads=2),
    dict(pos_encoding='learned', ffn='swiglu', norm='rmsnorm'),
    dict(norm_position='post', share_embeddings=False, ffn='gelu', num_kv_heads=1),
    dict(attention_impl='blockwise', attention_block_size=4),
]


@pytest.mark.parametrize('spec', [LM, S2S, CLS, REG], ids=lambda s: s.kind)
@pytest.mark.parametrize('variant', range(len(VARIANTS)))
def test_analytic_counts_equal_the_parameter_tree(spec, variant):
    from flaxformer_lite.accounting import tree_counts
    changes = dict(VARIANTS[variant])
    if spec.kind in ('classify', 'regress'):
        changes.pop('share_embeddings', None)
    m = model_cfg(spec, **changes)
    tree = jax.eval_shape(lambda: init(m, spec, batch_for(spec)))
    assert tree_counts(tree) == tf.count_params(m, spec)


def test_vaswani_base_has_about_65m_parameters():
    spec = TaskSpec(kind='seq2seq', vocab_size=37000, input_len=64, target_len=64, num_outputs=37000)
    base = config_lib.base_config('recall').model.to_dict()
    base['size'] = 'vaswani_base'
    m = tf.resolve(base, config_lib.SIZES['vaswani_base'], spec)
    assert (m['num_layers'], m['encoder_layers'], m['d_model'], m['d_ff'], m['num_heads']) == (6, 6, 512, 2048, 8)
    assert m['norm_position'] == 'post' and m['dropout'] == 0.1
    total = tf.count_params(m, spec)['total']
    assert abs(total - 65e6) / 65e6 < 0.05, total


def _stack_layers(params):
    """Unrolled parameters (layer_0, layer_1, ...) -> the scanned layout (layers, stacked)."""
    if not isinstance(params, dict):
        return params
    layers = sorted(k for k in params if k.startswith('layer_'))
    out = {k: _stack_layers(v) for k, v in params.items() if not k.startswith('layer_')}
    if layers:
        out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layers])
    return out


@pytest.mark.parametrize('spec', [LM, S2S, CLS], ids=lambda s: s.kind)
def test_scan_equals_unrolled(spec):
    batch = batch_for(spec)
    m = model_cfg(spec, num_kv_heads=2)
    params = init(m, spec, batch)
    unrolled = tf.build(m, spec).apply({'params': params}, batch)
    for remat in ('none', 'full', 'dots'):
        scanned_m = dict(m, scan_layers=True, remat=remat)
        scanned = tf.build(scanned_m, spec).apply({'params': _stack_layers(params)}, batch)
        np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)


def _stepwise_logits(m, spec, params, batch):
    fns = tf.decoder(m, spec)
    state = fns.init(params, batch)
    tokens = batch['inputs'] if spec.kind == 'lm' else shift_right(batch['targets'], spec.bos_id)
    out = []
    for t in range(tokens.shape[1]):
        logits, state = jax.jit(fns.step)(params, state, tokens[:, t])
        out.append(logits)
    return jnp.stack(out, axis=1)


def test_an_unset_layer_scan_is_chosen_by_depth_and_backend():
    """Unrolled on CPU at any depth (scanned steps measured slower there); scanned on an
    accelerator from SCAN_MIN_LAYERS on, the deeper of encoder and decoder deciding; a
    value the user set is kept; the resolved value is what a run saves."""
    assert model_cfg(LM)['scan_layers'] is False and model_cfg(LM, num_layers=48)['scan_layers'] is False
    deep = tf.SCAN_MIN_LAYERS
    assert tf.scan_pays(deep, 'gpu') and tf.scan_pays(deep, 'tpu') and not tf.scan_pays(deep - 1, 'gpu')
    assert not tf.scan_pays(10 * deep, 'cpu')
    assert model_cfg(LM, scan_layers=True)['scan_layers'] is True
    real = tf.scan_pays
    try:
        tf.scan_pays = lambda n, backend=None: real(n, 'gpu')
        assert model_cfg(S2S, num_layers=2, encoder_layers=deep)['scan_layers'] is True
        assert model_cfg(LM, num_layers=deep, scan_layers=False)['scan_layers'] is False
        assert model_cfg(LM, num_layers=deep - 1)['scan_layers'] is False
    finally:
        tf.scan_pays = real
    from conftest import tiny_config
    from flaxformer_lite import resolve
    assert config_lib.base_config('recall').model.scan_layers is None
    assert resolve.from_config(tiny_config()).config.model.scan_layers is False


@pytest.mark.parametrize('spec', [LM, S2S], ids=lambda s: s.kind)
@pytest.mark.parametrize('variant', [{}, dict(pos_encoding='rotary', num_kv_heads=2),
                                     dict(pos_encoding='learned', scan_layers=True),
                                     dict(attention_impl='blockwise', attention_block_size=3)])
def test_cached_decoding_equals_full_pass(spec, variant):
    batch = batch_for(spec)
    if spec.kind == 'lm':  # decoding feeds real tokens; padding is a full-pass matter
        batch['inputs'] = batch['inputs'].at[0, -3:].set(5)
    m = model_cfg(spec, **variant)
    params = init(m, spec, batch)
    full = tf.build(m, spec).apply({'params': params}, batch)
    np.testing.assert_allclose(_stepwise_logits(m, spec, params, batch), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_beam_one_equals_greedy(scan):
    batch = batch_for(S2S)
    m = model_cfg(S2S, scan_layers=scan)
    params = init(m, S2S, batch)
    fns = tf.decoder(m, S2S)
    greedy = decoding.greedy(fns, params, batch, length=6, bos_id=1)
    beam1 = decoding.beam_search(fns, params, batch, length=6, bos_id=1, beam_size=1)
    np.testing.assert_array_equal(beam1, greedy)
    beam3 = decoding.beam_search(fns, params, batch, length=6, bos_id=1, beam_size=3)
    assert beam3.shape == greedy.shape
    top1 = decoding.sample(fns, params, batch, length=6, bos_id=1, rng=jax.random.key(3), top_k=1)
    np.testing.assert_array_equal(top1, greedy)


def test_beam_search_beats_greedy_on_a_garden_path():
    """A 3-token Markov chain where the greedy first choice leads to a poor second step."""
    logp = jnp.log(jnp.array([
        [0.0, 0.55, 0.45],  # after BOS (0): token 1 looks best...
        [0.0, 0.5, 0.5],  # ...but after 1 everything is uncertain
        [0.0, 0.0, 1.0],  # while after 2 the continuation is certain
    ]) + 1e-12)
    fns = StepFns(init=lambda params, batch: {'last': jnp.zeros(batch['inputs'].shape[0], jnp.int32)},
                  step=lambda params, state, tok: (logp[tok], {'last': tok}))
    batch = {'inputs': jnp.zeros((1, 1), jnp.int32)}
    assert decoding.greedy(fns, None, batch, length=2, bos_id=0).tolist() == [[1, 1]]
    assert decoding.beam_search(fns, None, batch, length=2, bos_id=0, beam_size=2, alpha=0.0).tolist() == [[2, 2]]


@pytest.mark.parametrize('changes,field', [
    (dict(d_model=18), 'model.d_model'),
    (dict(num_kv_heads=3), 'model.num_kv_heads'),
    (dict(pos_encoding='learned', max_len=4), 'model.max_len'),
    (dict(attention_impl='flash9'), 'model.attention_impl'),
    (dict(attention_impl='xla', attention_dropout=0.1), 'model.attention_dropout'),
    (dict(arch='encoder_decoder'), 'model.arch'),
    (dict(ffn='tanh'), 'model.ffn'),
])
def test_configs_that_cannot_work_are_user_errors(changes, field):
    with pytest.raises(ConfigError, match=field):
        model_cfg(LM, **changes)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    batch = batch_for(LM)
    m = model_cfg(LM, dtype='bfloat16')
    params = init(m, LM, batch)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = tf.build(m, LM).apply({'params': params}, batch)
    assert logits.dtype == jnp.float32
    ref = tf.build(dict(m, dtype='float32'), LM).apply({'params': params}, batch)
    np.testing.assert_allclose(logits, ref, atol=0.15)


def test_dropout_is_active_only_in_training():
    batch = batch_for(LM)
    m = model_cfg(LM, dropout=0.3, attention_dropout=0.2)
    model = tf.build(m, LM)
    params = init(m, LM, batch)
    a = model.apply({'params': params}, batch, train=True, rngs={'dropout': jax.random.key(1)})
    b = model.apply({'params': params}, batch, train=True, rngs={'dropout': jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply({'params': params}, batch), model.apply({'params': params}, batch))


def test_flops_count_causal_attention_on_its_lower_triangle():
    m = model_cfg(LM)  # 2 layers, d_model 16, d_ff 32, tied output projection
    t, d = LM.input_len, 16
    kernels = 2 * (4 * d * d + 2 * d * 32) + d * LM.num_outputs  # no biases, norms or embedding lookups
    causal = 3 * 4 * d * 2 * t * (t + 1) / 2  # scores + sums, lower triangle with the diagonal, 2 layers
    assert tf.flops_per_example(m, LM) == pytest.approx(6 * kernels * t + causal)
    # the classifier: the same layers over every pair, the head once per example
    c = model_cfg(CLS)
    cls = 6 * (2 * (4 * d * d + 2 * d * 32)) * t + 3 * 4 * d * 2 * t * t + 6 * d * CLS.num_outputs
    assert tf.flops_per_example(c, CLS) == pytest.approx(cls)
    assert dataclasses.is_dataclass(tf.hparams(m, LM))
