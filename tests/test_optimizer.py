"""AdamW's weight decay falls on kernels and embeddings only, whatever the parameter's
rank: biases (recurrent gate biases, the LSTM forget bias of 1), norm parameters and
their `nn.scan`-stacked forms are never decayed, so scanned and unrolled models train
alike."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lite import data, resolve
from flaxformer_lite.train import optimizer, step as step_lib
from flaxformer_lite.train.state import TrainState

from conftest import tiny_config

# Every kind of parameter the families create: shapes x options.
VARIANTS = [
    ('recall', 'transformer', {}), ('recall', 'transformer', {'model__scan_layers': True}),
    ('recall', 'transformer', {'model__pos_encoding': 'learned', 'model__norm': 'rmsnorm', 'model__ffn': 'swiglu'}),
    ('seq2seq', 'transformer', {'model__share_embeddings': False}), ('listops', 'transformer', {}),
    ('recall', 'lstm', {}), ('recall', 'gru', {'model__share_embeddings': False}), ('listops', 'rnn', {}),
    ('seq2seq', 'gru', {'model__rnn_attention': 'bahdanau'}),
    ('seq2seq', 'lstm', {'model__rnn_attention': 'luong', 'model__bidirectional': True}),
]
OPTIM = {'optim__weight_decay': 0.5, 'optim__learning_rate': 1e-2, 'optim__warmup_steps': 0,
         'optim__schedule': 'constant', 'optim__grad_clip': 0.0}


def _params(exp):
    """The model and its initial parameters (one compiled init: op by op takes seconds)."""
    model = exp.family.build(exp.model_cfg, exp.spec)
    example = {k: jnp.asarray(v[None]) for k, v in exp.task.example('train', 0).items()}
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), example)['params'])


def _leaf_name(path):
    return path[-1].key


@pytest.mark.parametrize('task,model,extra', VARIANTS, ids=[f'{t}-{m}-{i}' for i, (t, m, _) in enumerate(VARIANTS)])
def test_one_update_with_zero_gradients_decays_only_kernels_and_tables(task, model, extra):
    exp = resolve.from_config(tiny_config(task=task, model=model, **extra, **OPTIM))
    _, params = _params(exp)
    tx, _ = optimizer.make(exp.config.optim, exp.config.train.steps)

    @jax.jit
    def one_update(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
    after = one_update(params)
    shrink = 1.0 - 1e-2 * 0.5
    seen = set()
    for (path, before), new in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(after)):
        name = _leaf_name(path)
        seen.add(name)
        if name in ('bias', 'b_hn', 'scale'):
            np.testing.assert_array_equal(new, before, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(new, before * shrink, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    if model == 'lstm':  # the forget-gate bias of 1 is there and stays 1
        stack = params['stack'] if 'stack' in params else params['encoder']
        bias = stack['fwd_0']['bias']
        assert bias.ndim == 2 and float(bias[1].min()) == 1.0
    assert 'bias' in seen and seen & {'kernel', 'w_ih'}


def test_a_parameter_of_unknown_role_is_refused():
    with pytest.raises(ValueError, match="add 'gain' to DECAYED or NOT_DECAYED"):
        optimizer.decay_mask({'layer': {'gain': jnp.ones((3,))}})


def _stack_layers(unrolled, num_layers):
    """Unrolled params (decoder/layer_i/...) -> the scanned layout (decoder/layers/... [L, ...])."""
    out = dict(unrolled)
    stack = dict(unrolled['decoder'])
    layers = [stack.pop(f'layer_{i}') for i in range(num_layers)]
    stack['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    out['decoder'] = stack
    return out


def test_scanned_and_unrolled_models_take_the_same_optimizer_steps():
    """Same weights, same batches, 3 AdamW steps with strong decay: equal parameters.
    (With decay masked by rank, the scanned [L, D] norm scales would shrink and these
    would differ by ~lr * decay per step.)"""
    # Adam's eps is raised from 1e-9: the key bias gets a gradient of zero up to rounding
    # (softmax ignores a constant added to every score), which eps=1e-9 would turn into
    # full-size steps in rounding-dependent directions.
    optim = dict(OPTIM, optim__eps=1e-3)
    finals = {}
    for scan in (False, True):
        exp = resolve.from_config(tiny_config(model__scan_layers=scan, **optim))
        model, params = _params(exp)
        if scan:
            reference = resolve.from_config(tiny_config(model__scan_layers=False, **optim))
            params = _stack_layers(_params(reference)[1], exp.config.model.num_layers)
        tx, lr = optimizer.make(exp.config.optim, exp.config.train.steps)
        train_step = jax.jit(step_lib.make_train_step(model, tx, lr, exp.spec.kind, label_smoothing=0.0, seed=0))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        batches = data.train_iterator(exp.task, batch_size=exp.config.train.batch_size, seed=0)
        for _ in range(3):
            state, _ = train_step(state, {k: jnp.asarray(v) for k, v in next(batches).items()},
                                  optimizer.step_inputs(exp.config.optim))
        finals[scan] = state.params
    expected = _stack_layers(finals[False], 2)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(finals[True])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
