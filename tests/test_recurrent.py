"""Recurrent baselines: cells against float64 NumPy, the fast forms against the plain ones,
counts against the real trees, decoding against the full pass, padding, matching."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lite.config import SIZES, base_config
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.models import REGISTRY, get
from flaxformer_lite.models.recurrent import RecurrentConfig, RecurrentStack
from flaxformer_lite.models.recurrence import RecurrentWeights, fused_recurrence, scan_recurrence
from flaxformer_lite.models.recurrent_cells import CELLS, RecurrentLayer, cell_kind
from flaxformer_lite.models.recurrent_family import matched_transformer_params
from flaxformer_lite.models.transformer import shift_right
from flaxformer_lite.spec import TaskSpec

MODEL = base_config('recall').model.to_dict()
LM = TaskSpec('lm', vocab_size=11, input_len=7, target_len=7, num_outputs=11)
S2S = TaskSpec('seq2seq', vocab_size=13, input_len=6, target_len=5, num_outputs=13)
CLS = TaskSpec('classify', vocab_size=11, input_len=8, target_len=1, num_outputs=3)
REG = TaskSpec('regress', vocab_size=11, input_len=8, target_len=1, num_outputs=1)
TOL = dict(rtol=2e-5, atol=2e-5)


def resolve(cell: str, spec: TaskSpec, size: str = 'tiny', **fields):
    return get(cell).resolve({**MODEL, 'name': cell, **fields}, SIZES[size], spec)


def random_params(model, *args, seed=0, scale=0.5):
    """Random parameters of the module's shapes, without compiling its init (threefry
    init programs take ~1 s each to compile on this CPU)."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['params'])
    return randomize(shapes, seed, scale)


def tokens(rng, shape, low=2, high=11):
    return jnp.asarray(rng.integers(low, high, size=shape), jnp.int32)


def randomize(params, seed, scale=0.5):
    """Random weights of a visible size (not the init's), so that every gate saturates
    somewhere and a swapped gate or a missing term shows."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, scale, l.shape), jnp.float32) for l in leaves])


# --- float64 NumPy reference -------------------------------------------------------------
def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_cell(cell, p, x_BD, carry):
    """The textbook equations, per gate, in float64, from the [in, gate, hidden] weights."""
    w_ih, w_hh, b = (np.asarray(p[k], np.float64) for k in ('w_ih', 'w_hh', 'bias'))
    h = carry[0]
    gx = np.einsum('bd,dgh->bgh', x_BD, w_ih) + b
    gh = np.einsum('bk,kgh->bgh', h, w_hh)
    if cell == 'rnn':
        return (np.tanh(gx[:, 0] + gh[:, 0]),)
    if cell == 'lstm':
        z = gx + gh
        i, f, g, o = _sig(z[:, 0]), _sig(z[:, 1]), np.tanh(z[:, 2]), _sig(z[:, 3])
        c = f * carry[1] + i * g
        return (o * np.tanh(c), c)
    b_hn = np.asarray(p['b_hn'], np.float64)
    r, z = _sig(gx[:, 0] + gh[:, 0]), _sig(gx[:, 1] + gh[:, 1])
    n = np.tanh(gx[:, 2] + r * (gh[:, 2] + b_hn))
    return ((1 - z) * n + z * h,)


def np_layer(cell, p, x_TBD, hidden):
    carry = tuple(np.zeros((x_TBD.shape[1], hidden)) for _ in range(2 if cell == 'lstm' else 1))
    out = []
    for x in np.asarray(x_TBD, np.float64):
        carry = np_cell(cell, p, x, carry)
        out.append(carry[0])
    return np.stack(out), carry


@pytest.mark.parametrize('cell', CELLS)
def test_cell_equals_float64_numpy_reference(cell):
    t, b, d, h = 6, 2, 3, 5
    x = jnp.asarray(np.random.default_rng(1).normal(size=(t, b, d)), jnp.float32)
    for fused in (True, False):
        layer = RecurrentLayer(cell, d, h, fused=fused)
        p = random_params(layer, x, seed=2, scale=0.8)
        ref_h, ref_carry = np_layer(cell, p, x, h)
        out, carry = jax.jit(layer.apply)({'params': p}, x)
        np.testing.assert_allclose(out, ref_h, **TOL)
        for got, want in zip(carry, ref_carry):
            np.testing.assert_allclose(got, want, **TOL)
        # the plain cell, one step at a time
        step_carry = tuple(jnp.zeros((b, h)) for _ in ref_carry)
        for i in range(t):
            step_carry, y = layer.apply({'params': p}, step_carry, x[i], method=RecurrentLayer.step)
            np.testing.assert_allclose(y, ref_h[i], **TOL)


def test_lstm_forget_gate_bias_starts_at_one_and_recurrent_weights_are_orthogonal():
    layer = RecurrentLayer('lstm', 3, 4)
    p = nn.unbox(jax.jit(layer.init)(jax.random.key(0, impl='rbg'), jnp.zeros((2, 1, 3)))['params'])
    np.testing.assert_array_equal(p['bias'], np.array([[0.] * 4, [1.] * 4, [0.] * 4, [0.] * 4]))
    assert p['w_ih'].shape == (3, cell_kind('lstm').num_gates, 4) and p['w_hh'].shape == (4, 4, 4)
    for gate in range(4):
        w = np.asarray(p['w_hh'][:, gate, :])
        np.testing.assert_allclose(w.T @ w, np.eye(4), atol=1e-5)
    assert not np.allclose(p['w_hh'][:, 0], p['w_hh'][:, 1])


@pytest.mark.parametrize('cell', CELLS)
def test_hoisted_fused_form_equals_plain_cell_values_and_gradients(cell):
    """The hoisted projection + custom-VJP scan against the cell stepped one token at a
    time, and its gradients against autodiff of the plain scan (with and without a pad
    mask, from a nonzero carry, with cotangents on the outputs and the final carry)."""
    t, b, d, h = 7, 3, 4, 5
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(t, b, d)), jnp.float32)
    mask = jnp.asarray(rng.random((t, b)) > 0.3)
    layer = RecurrentLayer(cell, d, h)
    p = random_params(layer, x, seed=4)
    kind = cell_kind(cell)
    carry0 = tuple(jnp.asarray(rng.normal(size=(b, h)), jnp.float32) for _ in range(kind.carry_size))
    g = kind.num_gates * h
    gx = jnp.asarray(rng.normal(size=(t, b, g)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.5, (h, g)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(g,)), jnp.float32)
    b_rec = jnp.asarray(rng.normal(size=(g,)), jnp.float32) if cell == 'gru' else None
    d_out = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)
    d_final = tuple(jnp.asarray(rng.normal(size=(b, h)), jnp.float32) for _ in carry0)

    @jax.jit
    def run(p, x, carry0, gx, bias, w, b_rec):
        out, final = layer.apply({'params': p}, x, carry0)
        carry, steps = carry0, []
        for i in range(t):
            carry, y = layer.apply({'params': p}, carry, x[i], method=RecurrentLayer.step)
            steps.append(y)
        grads = []
        for m in (None, mask):
            weights = RecurrentWeights(bias, w, b_rec)
            fused_out, fused_vjp = jax.vjp(lambda *a: fused_recurrence(kind, *a, m, unroll=2), gx, weights, carry0)
            plain_out, plain_vjp = jax.vjp(lambda *a: scan_recurrence(kind, *a, m), gx, weights, carry0)
            grads.append((fused_out, plain_out, fused_vjp((d_out, d_final)), plain_vjp((d_out, d_final))))
        return out, final, jnp.stack(steps), carry, grads

    out, final, steps, carry, grads = run(p, x, carry0, gx, bias, w, b_rec)
    np.testing.assert_allclose(out, steps, **TOL)
    for a, e in zip(final, carry):
        np.testing.assert_allclose(a, e, **TOL)
    for fused_out, plain_out, got, want in grads:
        for a, e in zip(jax.tree.leaves(fused_out), jax.tree.leaves(plain_out)):
            np.testing.assert_allclose(a, e, **TOL)
        assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(want)) == 3 + len(carry0) + (cell == 'gru')
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_cell_kinds_by_config_name():
    """The config's names map to one object per kind; its layout matches the layer's tree."""
    assert CELLS == ('rnn', 'gru', 'lstm')
    for name, gates, carry in (('rnn', 1, 1), ('gru', 3, 1), ('lstm', 4, 2)):
        kind = cell_kind(name)
        assert (kind.name, kind.num_gates, kind.carry_size) == (name, gates, carry)
        shapes = jax.eval_shape(lambda: RecurrentLayer(name, 3, 5).init(jax.random.key(0), jnp.zeros((2, 1, 3))))
        assert kind.param_count(3, 5) == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    with pytest.raises(ValueError, match="unknown cell 'elman'"):
        cell_kind('elman')


@pytest.mark.parametrize('cell', CELLS)
def test_bidirectional_equals_two_one_way_passes(cell):
    t, b, h = 6, 2, 4
    cfg = RecurrentConfig(cell, 10, 10, 1, 1, hidden=h, bidirectional=True)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)
    stack = RecurrentStack(cfg, 1, h, bidirectional=True)
    p = random_params(stack, x, seed=6)
    one_way = RecurrentLayer(cell, h, h)
    lengths = [6, 3]
    mask = jnp.arange(t)[:, None] < jnp.asarray(lengths)[None]

    @jax.jit
    def run(p, x):
        y, finals = stack.apply({'params': p}, x)
        fwd, _ = one_way.apply({'params': p['fwd_0']}, x)
        bwd, bwd_final = one_way.apply({'params': p['bwd_0']}, x[::-1])
        # with trailing pads, the backward pass starts at each sequence's own last token
        y_pad, _ = stack.apply({'params': p}, x, mask)
        alone = [(one_way.apply({'params': p['fwd_0']}, x[:n, i:i + 1])[0],
                  one_way.apply({'params': p['bwd_0']}, x[:n, i:i + 1][::-1])[0]) for i, n in enumerate(lengths)]
        return y, finals, fwd, bwd, bwd_final, y_pad, alone

    y, finals, fwd, bwd, bwd_final, y_pad, alone = run(p, x)
    np.testing.assert_allclose(y, jnp.concatenate([fwd, bwd[::-1]], -1), **TOL)
    np.testing.assert_allclose(finals[0][1][0], bwd_final[0], **TOL)
    for i, (n, (fwd_i, bwd_i)) in enumerate(zip(lengths, alone)):
        np.testing.assert_allclose(y_pad[:n, i, :h], fwd_i[:, 0], **TOL)
        np.testing.assert_allclose(y_pad[:n, i, h:], bwd_i[::-1, 0], **TOL)


def test_projecting_the_embedding_table_equals_projecting_every_token():
    """(table @ W)[tokens] for the first layer, in both directions, is table[tokens] @ W."""
    cfg = RecurrentConfig('lstm', 10, 10, 2, 2, hidden=4, bidirectional=True)
    rng = np.random.default_rng(17)
    table = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 10, (6, 3)), jnp.int32)
    stack = RecurrentStack(cfg, 2, 4, bidirectional=True)
    p = random_params(stack, table[toks], seed=18)
    run = jax.jit(lambda p: (stack.apply({'params': p}, table[toks])[0],
                             stack.apply({'params': p}, None, tokens=(toks, table))[0]))
    plain, folded = run(p)
    np.testing.assert_allclose(folded, plain, **TOL)


SHAPES = [
    (LM, {}), (LM, {'share_embeddings': False, 'num_layers': 3, 'residual': True}),
    (CLS, {}), (CLS, {'bidirectional': True, 'num_layers': 3}), (REG, {'bidirectional': True}),
    (S2S, {}), (S2S, {'bidirectional': True, 'encoder_layers': 3}),
    (S2S, {'rnn_attention': 'bahdanau', 'share_embeddings': False}),
    (S2S, {'rnn_attention': 'bahdanau', 'bidirectional': True, 'num_layers': 1}),
    (S2S, {'rnn_attention': 'luong'}), (S2S, {'rnn_attention': 'luong', 'bidirectional': True, 'residual': True}),
]


def _batch(spec, rng, batch=2):
    out = {'inputs': tokens(rng, (batch, spec.input_len), high=spec.vocab_size)}
    if spec.kind in ('lm', 'seq2seq'):
        out['targets'] = tokens(rng, (batch, spec.target_len), high=spec.num_outputs)
    return out


@pytest.mark.parametrize('cell', CELLS)
def test_count_params_equals_the_real_tree_for_every_shape(cell):
    rng = np.random.default_rng(7)
    for spec, fields in SHAPES:
        m = resolve(cell, spec, hidden=6, **fields)
        model = get(cell).build(m, spec)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _batch(spec, rng)))['params']
        real = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        embedding = sum(int(np.prod(s.shape)) for path, s in jax.tree_util.tree_leaves_with_path(shapes)
                        if 'embed' in jax.tree_util.keystr(path))
        counts = get(cell).count_params(m, spec)
        assert counts['total'] == real, (spec.kind, fields)
        assert counts['embedding'] == embedding, (spec.kind, fields)
        assert counts['non_embedding'] == real - embedding


def test_output_shapes_and_flops():
    rng = np.random.default_rng(8)
    expect = {'lm': (2, 7, 11), 'seq2seq': (2, 5, 13), 'classify': (2, 3), 'regress': (2,)}
    for spec in (LM, S2S, CLS, REG):
        model = get('gru').build(resolve('gru', spec, hidden=6), spec)
        batch = _batch(spec, rng)
        out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), batch), batch))
        assert out.shape == expect[spec.kind] and out.dtype == jnp.float32
    # LM: 6 FLOPs per matrix weight per token (biases are elementwise), tied output projection included.
    m = resolve('lstm', LM, hidden=6, num_layers=2)
    weights = 2 * 4 * (6 * 6 + 6 * 6) + 6 * LM.num_outputs
    assert get('lstm').flops_per_example(m, LM) == 6 * weights * LM.input_len
    # Classifier: the head once per example, not per token.
    c = resolve('lstm', CLS, hidden=6, num_layers=1)
    assert get('lstm').flops_per_example(c, CLS) == 6 * (4 * 12 * 6 * CLS.input_len + 6 * CLS.num_outputs)
    # seq2seq: attention adds per (target, source) pair work; the encoder scales with the source.
    base = get('lstm').flops_per_example(resolve('lstm', S2S, hidden=6), S2S)
    luong = get('lstm').flops_per_example(resolve('lstm', S2S, hidden=6, rnn_attention='luong'), S2S)
    longer = TaskSpec('seq2seq', 13, 12, 5, 13)
    assert luong > base and get('lstm').flops_per_example(resolve('lstm', longer, hidden=6), longer) > base


@pytest.mark.parametrize('cell', CELLS)
def test_parameter_matching_within_six_percent(cell):
    """The matched width is the multiple of 8 closest to the Transformer's count, within
    6%. Where no multiple of 8 lands within 6% (small widths, where a step of 8 moves the
    count by 10-20%), it is the closest multiple of the largest divisor of 8 that does."""
    specs = [TaskSpec('lm', 256, 64, 64, 256), TaskSpec('classify', 256, 64, 1, 10),
             TaskSpec('seq2seq', 256, 64, 64, 256)]
    for size in ('tiny', 'mini', 'small', 'medium', 'base', 'large'):
        for spec in specs:
            variants = [{}] if spec.kind == 'lm' else [{}, {'bidirectional': True}]
            if spec.kind == 'seq2seq':
                variants += [{'rnn_attention': 'bahdanau'}, {'rnn_attention': 'luong', 'bidirectional': True}]
            for fields in variants:
                m = resolve(cell, spec, size, **fields)
                target = matched_transformer_params({**MODEL, 'name': cell, **fields}, SIZES[size], spec)

                def error(h):
                    return abs(get(cell).count_params({**m, 'hidden': h}, spec)['non_embedding'] - target) / target

                step = next(d for d in (8, 4, 2, 1) if any(error(h) <= 0.06 for h in range(d, 4096, d)))
                where = (cell, size, spec.kind, fields, m['hidden'])
                assert m['hidden'] % step == 0 and error(m['hidden']) <= 0.06, where
                assert error(m['hidden']) == min(error(h) for h in range(step, 4096, step)), where
                assert step == 8 or size in ('tiny', 'mini'), where  # from `small` on always a multiple of 8
                assert m['num_layers'] == SIZES[size]['num_layers']
    # the target is the Transformer's own count
    lm = specs[0]
    t = get('transformer')
    assert matched_transformer_params(MODEL, SIZES['small'], lm) == t.count_params(
        t.resolve(dict(MODEL), SIZES['small'], lm), lm)['non_embedding']
    assert resolve(cell, lm, hidden=33)['hidden'] == 33  # an explicit width is kept


@pytest.mark.parametrize('fields, spec, name', [
    ({'hidden': 0}, LM, 'model.hidden'), ({'bidirectional': True}, LM, 'model.bidirectional'),
    ({'rnn_attention': 'dot'}, S2S, 'model.rnn_attention'),
    ({'rnn_attention': 'luong'}, CLS, 'model.rnn_attention'),
    ({'unroll': 0}, LM, 'model.unroll'), ({'num_layers': 0}, LM, 'model.num_layers'),
    ({'pooling': 'max'}, CLS, 'model.pooling'), ({'arch': 'decoder_only'}, CLS, 'model.arch'),
    ({'dropout': 1.0}, LM, 'model.dropout'),
    ({}, TaskSpec('lm', 11, 7, 7, 12), 'model.share_embeddings'),
])
def test_impossible_configs_raise_one_line(fields, spec, name):
    with pytest.raises(ConfigError, match=name.replace('.', r'\.')):
        resolve('lstm', spec, **fields)


@pytest.mark.parametrize('cell', CELLS)
def test_gradients_stay_finite_over_2048_steps_with_clipping(cell):
    spec = TaskSpec('lm', vocab_size=7, input_len=2048, target_len=2048, num_outputs=7)
    model = get(cell).build(resolve(cell, spec, hidden=8, num_layers=1), spec)
    rng = np.random.default_rng(9)
    toks = tokens(rng, (2, 2049), high=7)
    params = random_params(model, {'inputs': toks[:, :-1]}, seed=10, scale=1.5)  # large: explosive
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            logits = model.apply({'params': p}, {'inputs': toks[:, :-1]})
            return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        norms = optax.global_norm(grads), optax.global_norm(updates)
        return optax.apply_updates(params, updates), state, loss, *norms

    state = opt.init(params)
    for _ in range(3):
        new, state, loss, gnorm, unorm = step(params, state)
        assert np.isfinite(loss) and np.isfinite(gnorm) and gnorm > 0
        assert unorm <= 0.1 * 1.0 + 1e-5  # clipped to norm 1, times the learning rate
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(new))
        params = new


DECODE_CASES = [(LM, {'num_layers': 2, 'residual': True}),
                (S2S, {'bidirectional': True, 'rnn_attention': 'bahdanau', 'num_layers': 2})]
DECODE_CASES_LSTM = [(S2S, {}), (S2S, {'rnn_attention': 'luong', 'share_embeddings': False, 'encoder_layers': 1,
                                       'num_layers': 2})]


@pytest.mark.parametrize('cell, spec, fields', [(c, s, f) for c in CELLS for s, f in DECODE_CASES]
                         + [('lstm', s, f) for s, f in DECODE_CASES_LSTM])
def test_stepwise_decoding_equals_full_pass(cell, spec, fields):
    """StepFns (carried state, one token per step) give the full pass's logits."""
    rng = np.random.default_rng(11)
    m = resolve(cell, spec, hidden=6, **fields)
    family = get(cell)
    model = family.build(m, spec)
    batch = _batch(spec, rng)
    if spec.kind == 'seq2seq':
        batch['inputs'] = batch['inputs'].at[1, 4:].set(spec.pad_id)  # a padded source
    params = random_params(model, batch, seed=12)
    fns = family.decoder(m, spec)
    fed_BT = batch['inputs'] if spec.kind == 'lm' else shift_right(batch['targets'], spec.bos_id)

    @jax.jit
    def run(params, batch):
        full = model.apply({'params': params}, batch)
        state = fns.init(params, batch)
        steps = []
        for t in range(fed_BT.shape[1]):  # a Python loop: each step is the decoder's own call
            logits, state = fns.step(params, state, fed_BT[:, t])
            steps.append(logits)
        return full, jnp.stack(steps, 1), state

    full, stepped, state = run(params, batch)
    np.testing.assert_allclose(stepped, full, **TOL)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(state))  # batch-leading (beam search)


@pytest.mark.parametrize('cell', CELLS)
def test_padded_inputs_classify_like_unpadded(cell):
    """Row 1 is row 0's first 5 tokens then pads: it must score like those 5 tokens alone."""
    rng = np.random.default_rng(13)
    toks = np.array(tokens(rng, (2, 8)))
    toks[1, :5] = toks[0, :5]
    toks[1, 5:] = CLS.pad_id
    configs = (('mean', True), ('first', True), ('last', True), ('last', False))
    models, params = [], []
    for pooling, bidirectional in configs:
        m = resolve(cell, CLS, hidden=5, num_layers=2, pooling=pooling, bidirectional=bidirectional,
                    residual=True)
        models.append(get(cell).build(m, CLS))
        params.append(random_params(models[-1], {'inputs': jnp.asarray(toks)}, seed=14))

    @jax.jit
    def run(params):
        return [(model.apply({'params': p}, {'inputs': jnp.asarray(toks)}),
                 model.apply({'params': p}, {'inputs': jnp.asarray(toks[:1, :5])}))
                for model, p in zip(models, params)]

    for config, (out, alone) in zip(configs, run(params)):
        np.testing.assert_allclose(out[1], alone[0], **TOL, err_msg=str(config))
        assert not np.allclose(out[0], out[1])  # the pads are not simply ignored by accident


def test_dropout_only_in_training_and_registry_names():
    rng = np.random.default_rng(15)
    m = resolve('lstm', LM, hidden=8, num_layers=2, dropout=0.5)
    model = get('lstm').build(m, LM)
    batch = _batch(LM, rng)
    params = random_params(model, batch)
    apply = jax.jit(model.apply, static_argnames='train')
    eval_a = apply({'params': params}, batch)
    np.testing.assert_array_equal(eval_a, apply({'params': params}, batch))
    train = apply({'params': params}, batch, train=True, rngs={'dropout': jax.random.key(1)})
    assert not np.allclose(train, eval_a)
    assert {'rnn', 'lstm', 'gru'} <= set(REGISTRY)


def test_bfloat16_compute_and_unroll_give_the_same_model():
    rng = np.random.default_rng(16)
    batch = _batch(LM, rng)
    m = resolve('lstm', LM, hidden=8)
    ref_model = get('lstm').build(m, LM)
    params = random_params(ref_model, batch, scale=0.3)
    models = [ref_model, get('lstm').build({**m, 'unroll': 3}, LM),
              get('lstm').build({**m, 'dtype': 'bfloat16'}, LM)]
    ref, unrolled, bf16 = jax.jit(lambda p: [model.apply({'params': p}, batch) for model in models])(params)
    np.testing.assert_allclose(unrolled, ref, **TOL)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, ref, atol=5e-2)
    assert not np.allclose(bf16, ref, atol=1e-6)  # it did compute in bfloat16
