"""Attention against a float64 NumPy reference; causality, padding, and the blockwise
backward pass against autodiff of the reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite.models import attention
from flaxformer_lite.models.transformer import Stack, TransformerConfig


def reference(q, k, v, mask):
    """softmax(q k^T / sqrt(d) masked) v in float64, heads grouped as in GQA."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = k.shape[2]
    out = np.zeros((b, t, h, d))
    for head in range(h):
        kv = head // (h // g)
        logits = np.einsum('btd,bsd->bts', q[:, :, head], k[:, :, kv]) / np.sqrt(d)
        if mask is not None:
            logits = np.where(mask, logits, -1e30)
        logits -= logits.max(-1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum('bts,bsd->btd', w, v[:, :, kv])
    return out


def _inputs(seed, b=2, t=7, s=9, h=4, g=2, d=8):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, t, h, d)).astype(np.float32)
    k = r.normal(size=(b, s, g, d)).astype(np.float32)
    v = r.normal(size=(b, s, g, d)).astype(np.float32)
    return q, k, v, r


def _run(impl, q, k, v, *, causal=False, kv_valid=None, mask=None, block=4):
    if impl == 'blockwise':
        return attention.blockwise_attention(q, k, v, causal=causal, kv_valid_BS=kv_valid, mask_BTS=mask,
                                             block_size=block)
    full = attention.build_mask(q.shape[1], k.shape[1], causal=causal, kv_valid_BS=kv_valid, mask_BTS=mask)
    if impl == 'xla':
        return attention.xla_attention(q, k, v, full)
    return attention.einsum_attention(q, k, v, full)


@pytest.mark.parametrize('impl', attention.IMPLEMENTATIONS)
@pytest.mark.parametrize('groups', [4, 2, 1])
def test_equals_float64_reference_with_random_masks(impl, groups):
    q, k, v, r = _inputs(groups, g=groups)
    mask = r.random((2, 7, 9)) < 0.6
    mask[:, :, 0] = True  # no empty rows: their output is defined but not meaningful
    kv_valid = np.ones((2, 9), bool)
    kv_valid[1, 6:] = False
    combined = mask & kv_valid[:, None, :]
    got = _run(impl, q, k, v, kv_valid=kv_valid, mask=mask)
    np.testing.assert_allclose(got, reference(q, k, v, combined), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', attention.IMPLEMENTATIONS)
@pytest.mark.parametrize('block', [3, 4, 16])
def test_causal_and_padding_equal_reference(impl, block):
    q, k, v, _ = _inputs(7, t=9, s=9)
    kv_valid = np.ones((2, 9), bool)
    kv_valid[0, 7:] = False
    causal = np.tril(np.ones((9, 9), bool))[None] & kv_valid[:, None, :]
    got = _run(impl, q, k, v, causal=True, kv_valid=kv_valid, block=block)
    np.testing.assert_allclose(got, reference(q, k, v, causal), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_blockwise_gradients_equal_reference_gradients(causal):
    q, k, v, r = _inputs(3, t=9, s=9)
    kv_valid = np.ones((2, 9), bool)
    kv_valid[1, 5:] = False
    mask = r.random((2, 9, 9)) < 0.7
    mask[:, :, 0] = True
    cot = r.normal(size=q.shape).astype(np.float32)

    def loss(impl):
        return lambda q, k, v: (_run(impl, q, k, v, causal=causal, kv_valid=kv_valid, mask=mask, block=4) * cot).sum()

    want = jax.grad(loss('einsum'), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss('blockwise'), argnums=(0, 1, 2))(q, k, v)
    for g_want, g_got in zip(want, got):
        np.testing.assert_allclose(g_got, g_want, atol=1e-4, rtol=1e-4)


def _stack(impl, causal):
    cfg = TransformerConfig(vocab_size=11, num_outputs=11, num_layers=2, encoder_layers=2, d_model=16, num_heads=4,
                            num_kv_heads=2, d_ff=32, max_len=16, attention_impl=impl, attention_block_size=3)
    return Stack(cfg, 2, causal=causal, cross=False, deterministic=True)


@pytest.mark.parametrize('impl', attention.IMPLEMENTATIONS)
def test_causality_by_gradients(impl):
    """d out[i] / d x[j] is exactly zero for every j > i."""
    stack = _stack(impl, causal=True)
    x = jax.random.normal(jax.random.key(0), (1, 8, 16))
    params = stack.init(jax.random.key(1), x)
    jac = jax.jacrev(lambda x: stack.apply(params, x)[0])(x)  # [T, D, 1, T, D]
    influence = np.abs(np.asarray(jac)).sum(axis=(1, 2, 4))  # [T_out, T_in]
    assert np.all(influence[np.triu_indices(8, k=1)] == 0.0)
    assert np.all(np.diag(influence) > 0) and influence[7, 0] > 0


@pytest.mark.parametrize('impl', attention.IMPLEMENTATIONS)
def test_padded_keys_do_not_change_real_positions(impl):
    stack = _stack(impl, causal=False)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    valid = jnp.array([[True] * 5 + [False] * 3, [True] * 8])
    params = stack.init(jax.random.key(1), x, None, valid)
    changed = x.at[0, 5:].set(jax.random.normal(jax.random.key(2), (3, 16)) * 10)
    a = stack.apply(params, x, None, valid)
    b = stack.apply(params, changed, None, valid)
    np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0, 5:], b[0, 5:])


@pytest.mark.parametrize('t, s, q_offset, q_block', [(37, 37, 0, None), (37, 37, 0, 6), (5, 40, 21, None),
                                                      (1, 40, 30, None), (12, 40, 9, 8)])
def test_causal_blockwise_skipping_masked_blocks_equals_einsum(t, s, q_offset, q_block):
    """Several query and key blocks (both padded), the causal range bounded per block;
    queries at an offset (a KV cache being filled: later keys unwritten) under jit, where
    the offset is traced. Outputs and all three gradients equal einsum attention's."""
    r = np.random.default_rng(t + s)
    q = r.normal(size=(2, t, 4, 8)).astype(np.float32)
    k, v = (r.normal(size=(2, s, 2, 8)).astype(np.float32) for _ in range(2))
    kv_valid = np.ones((2, s), bool)
    kv_valid[1, 3] = False
    mask = r.random((2, t, s)) < 0.8
    mask[:, :, 0] = True
    cot = r.normal(size=q.shape).astype(np.float32)

    def loss(impl):
        def f(q, k, v, offset):
            if impl == 'blockwise':
                out = attention.blockwise_attention(q, k, v, causal=True, q_offset=offset, kv_valid_BS=kv_valid,
                                                    mask_BTS=mask, block_size=4, q_block_size=q_block)
            else:
                full = attention.build_mask(t, s, causal=True, q_offset=offset, kv_valid_BS=kv_valid, mask_BTS=mask)
                out = attention.einsum_attention(q, k, v, full)
            return (out * cot).sum(), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, want), want_grads = loss('einsum')(q, k, v, q_offset)
    (_, got), got_grads = loss('blockwise')(q, k, v, q_offset)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    for g_want, g_got in zip(want_grads, got_grads):
        np.testing.assert_allclose(g_got, g_want, atol=1e-4, rtol=1e-4)
