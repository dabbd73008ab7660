"""Scaled dot-product and multi-head attention (self and cross), masks, KV cache.

Three implementations of softmax(q k^T / sqrt(d) + mask) v behind one switch:
  einsum     the plain reference: materialises the [T, S] weights (supports dropout).
  xla        `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs where it applies).
  blockwise  online softmax over key blocks with a hand-written backward pass (flash
             attention's recurrences), so memory grows linearly with sequence length on
             any backend: only O(T) statistics are kept between the passes.
Masks are given by structure (`causal`, `kv_valid_BS` for padded keys) and, optionally,
an explicit boolean `mask_BTS` (True = may attend). Query/key head groups: `num_kv_heads`
< `num_heads` is grouped-query attention, 1 is multi-query.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models.embeddings import apply_rotary
from flaxformer_lite.models.layers import Dense, Dtype, constrain

IMPLEMENTATIONS = ('einsum', 'xla', 'blockwise')
_NEG = -1e30  # finite "minus infinity": fully masked rows stay finite (uniform weights)


def build_mask(t: int, s: int, *, causal: bool, q_offset: jax.Array | int = 0,
               kv_valid_BS: jax.Array | None = None, mask_BTS: jax.Array | None = None) -> jax.Array | None:
    """The combined boolean mask [B|1, T, S] (None if nothing is masked)."""
    mask = None
    if causal:
        q_pos = jnp.arange(t)[:, None] + q_offset
        mask = (q_pos >= jnp.arange(s)[None, :])[None]
    if kv_valid_BS is not None:
        pad = kv_valid_BS[:, None, :]
        mask = pad if mask is None else mask & pad
    if mask_BTS is not None:
        mask = mask_BTS if mask is None else mask & mask_BTS
    return mask


def _group(q_BTHK: jax.Array, num_kv_heads: int) -> jax.Array:
    b, t, h, k = q_BTHK.shape
    assert h % num_kv_heads == 0, f'{h} query heads do not split into {num_kv_heads} groups'
    return q_BTHK.reshape(b, t, num_kv_heads, h // num_kv_heads, k)


def einsum_attention(q_BTHK, k_BSGK, v_BSGK, mask, *, dropout_rate=0.0, dropout_rng=None,
                     deterministic=True):
    """Reference implementation; `mask` is [B|1, T, S] or None."""
    b, t, h, kd = q_BTHK.shape
    g = k_BSGK.shape[2]
    q = _group(q_BTHK, g).astype(jnp.float32) / math.sqrt(kd)
    logits_BGRTS = jnp.einsum('btgrk,bsgk->bgrts', q, k_BSGK.astype(jnp.float32))
    if mask is not None:
        logits_BGRTS = jnp.where(mask[:, None, None], logits_BGRTS, _NEG)
    weights = jax.nn.softmax(logits_BGRTS, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum('bgrts,bsgk->btgrk', weights, v_BSGK.astype(jnp.float32))
    return out.reshape(b, t, h, kd).astype(q_BTHK.dtype)


def xla_attention(q_BTHK, k_BSGK, v_BSGK, mask):
    """`jax.nn.dot_product_attention`; XLA picks the kernel (cuDNN where supported)."""
    if mask is not None:
        mask = mask[:, None]  # [B|1, 1, T, S]
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask)


def blockwise_attention(q_BTHK, k_BSGK, v_BSGK, *, causal=False, q_offset=0, kv_valid_BS=None,
                        mask_BTS=None, block_size=128):
    """Memory-efficient attention: keys in blocks of `block_size`, online softmax forward,
    recomputing backward. Equal to `einsum_attention` up to float rounding."""
    b, t, h, kd = q_BTHK.shape
    s, g = k_BSGK.shape[1], k_BSGK.shape[2]
    blk = min(block_size, s)
    pad = (-s) % blk
    valid = jnp.ones((b, s), bool) if kv_valid_BS is None else jnp.broadcast_to(kv_valid_BS, (b, s))
    if pad:
        k_BSGK = jnp.pad(k_BSGK, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_BSGK = jnp.pad(v_BSGK, ((0, 0), (0, pad), (0, 0), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
        if mask_BTS is not None:
            mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, 0), (0, pad)))
    q_pos = jnp.arange(t) + q_offset
    extra = jnp.ones((1, t, s + pad), bool) if mask_BTS is None else mask_BTS
    out = _flash(causal, blk, _group(q_BTHK, g), k_BSGK, v_BSGK, valid, q_pos, extra)
    return out.reshape(b, t, h, kd).astype(q_BTHK.dtype)


def _block_inputs(k_BSGK, v_BSGK, valid_BS, extra_BTS, blk):
    """Split the key axis into blocks (leading axis) for `lax.scan`."""
    b, s, g, kd = k_BSGK.shape
    n = s // blk
    kb = k_BSGK.reshape(b, n, blk, g, kd).swapaxes(0, 1)
    vb = v_BSGK.reshape(b, n, blk, g, kd).swapaxes(0, 1)
    validb = valid_BS.reshape(b, n, blk).swapaxes(0, 1)
    extrab = extra_BTS.reshape(extra_BTS.shape[0], extra_BTS.shape[1], n, blk).transpose(2, 0, 1, 3)
    kpos = jnp.arange(s).reshape(n, blk)
    return kb, vb, validb, extrab, kpos


def _block_scores(q, k_blk, valid_blk, extra_blk, kpos, q_pos, causal):
    """Masked scores of all queries against one key block: [B, G, R, T, blk]."""
    scores = jnp.einsum('btgrk,bsgk->bgrts', q, k_blk.astype(jnp.float32))
    mask = valid_blk[:, None, :] & extra_blk  # [B, T, blk]
    if causal:
        mask = mask & (q_pos[:, None] >= kpos[None, :])[None]
    mask = mask[:, None, None]
    return jnp.where(mask, scores, _NEG), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(causal, blk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS):
    return _flash_fwd(causal, blk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS)[0]


def _flash_fwd(causal, blk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS):
    b, t, g, r, kd = q_BTGRK.shape
    q = q_BTGRK.astype(jnp.float32) / math.sqrt(kd)
    blocks = _block_inputs(k_BSGK, v_BSGK, valid_BS, extra_BTS, blk)

    def body(carry, xs):
        m, l, acc = carry
        k_blk, v_blk, valid_blk, extra_blk, kpos = xs
        scores, _ = _block_scores(q, k_blk, valid_blk, extra_blk, kpos, q_pos, causal)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum('bgrts,bsgk->bgrtk', p, v_blk.astype(jnp.float32))
        return (m_new, l, acc), None

    init = (jnp.full((b, g, r, t), -jnp.inf, jnp.float32), jnp.zeros((b, g, r, t), jnp.float32),
            jnp.zeros((b, g, r, t, kd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, blocks)
    out_BGRTK = acc / l[..., None]
    lse = m + jnp.log(l)
    out = out_BGRTK.transpose(0, 3, 1, 2, 4)  # [B, T, G, R, K]
    return out, (q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS, out_BGRTK, lse)


def _flash_bwd(causal, blk, res, d_out_BTGRK):
    q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS, out_BGRTK, lse = res
    kd = q_BTGRK.shape[-1]
    scale = 1.0 / math.sqrt(kd)
    q = q_BTGRK.astype(jnp.float32) * scale
    do = d_out_BTGRK.astype(jnp.float32).transpose(0, 2, 3, 1, 4)  # [B, G, R, T, K]
    delta = (do * out_BGRTK).sum(-1)  # [B, G, R, T]
    blocks = _block_inputs(k_BSGK, v_BSGK, valid_BS, extra_BTS, blk)

    def body(dq, xs):
        k_blk, v_blk, valid_blk, extra_blk, kpos = xs
        scores, mask = _block_scores(q, k_blk, valid_blk, extra_blk, kpos, q_pos, causal)
        p = jnp.exp(scores - lse[..., None])
        dv = jnp.einsum('bgrts,bgrtk->bsgk', p, do)
        dp = jnp.einsum('bgrtk,bsgk->bgrts', do, v_blk.astype(jnp.float32))
        ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0)
        dq = dq + jnp.einsum('bgrts,bsgk->btgrk', ds, k_blk.astype(jnp.float32))
        dk = jnp.einsum('bgrts,btgrk->bsgk', ds, q)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), blocks)
    n, b, _, g, _ = dk.shape
    dk = dk.swapaxes(0, 1).reshape(k_BSGK.shape)
    dv = dv.swapaxes(0, 1).reshape(v_BSGK.shape)
    return ((dq * scale).astype(q_BTGRK.dtype), dk.astype(k_BSGK.dtype), dv.astype(v_BSGK.dtype),
            None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, attend per head, concatenate, project back.

    Self-attention when `x_kv` is None, cross-attention otherwise. With `decode=True`
    (self-attention only) keys and values are appended to a cache of `max_len`
    positions in the 'cache' collection, one or more tokens per call.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int
    impl: str = 'einsum'
    block_size: int = 128
    dropout: float = 0.0
    rotary: bool = False
    decode: bool = False
    max_len: int = 0  # cache length for decode
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, x_kv_BSD=None, *, causal: bool = False, kv_valid_BS=None, mask_BTS=None,
                 positions_BT=None, deterministic: bool = True):
        self_attention = x_kv_BSD is None
        x_kv_BSD = x_BTD if self_attention else x_kv_BSD
        q = Dense((self.num_heads, self.head_dim), ('embed', 'heads', 'kv'), dtype=self.dtype, name='query')(x_BTD)
        k = Dense((self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'kv'), dtype=self.dtype,
                  name='key')(x_kv_BSD)
        v = Dense((self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'kv'), dtype=self.dtype,
                  name='value')(x_kv_BSD)
        q = constrain(q, ('act_batch', 'act_length', 'act_heads', None))
        t = x_BTD.shape[1]
        use_cache = self.decode and self_attention
        index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32)) if use_cache else None
        q_offset = index.value if use_cache else 0
        if self.rotary and self_attention:
            # Keys are rotated before caching, at the same positions as their queries.
            pos_BT = positions_BT if positions_BT is not None else (jnp.arange(t) + q_offset)[None]
            q, k = apply_rotary(q, pos_BT), apply_rotary(k, pos_BT)
        if use_cache:
            k, v, kv_valid_BS = self._cache(k, v, kv_valid_BS, index)
        impl = self.impl
        if impl == 'blockwise':
            out = blockwise_attention(q, k, v, causal=causal, q_offset=q_offset, kv_valid_BS=kv_valid_BS,
                                      mask_BTS=mask_BTS, block_size=self.block_size)
        else:
            mask = build_mask(t, k.shape[1], causal=causal, q_offset=q_offset, kv_valid_BS=kv_valid_BS,
                              mask_BTS=mask_BTS)
            if impl == 'xla':
                out = xla_attention(q, k, v, mask)
            elif impl == 'einsum':
                rng = None if deterministic or self.dropout == 0 else self.make_rng('dropout')
                out = einsum_attention(q, k, v, mask, dropout_rate=self.dropout, dropout_rng=rng,
                                       deterministic=deterministic)
            else:
                raise ValueError(f'unknown attention implementation {impl}')
        out = constrain(out, ('act_batch', 'act_length', 'act_heads', None))
        return Dense(self.d_model, ('heads', 'kv', 'embed'), axis=(-2, -1), dtype=self.dtype, name='out')(out)

    def _cache(self, k_BTGK, v_BTGK, kv_valid_BS, index):
        """Write this call's keys/values at the cache index; attend over the whole cache
        (positions not yet written are masked by causality)."""
        b, t, g, kd = k_BTGK.shape
        shape = (b, self.max_len, g, kd)
        ck = self.variable('cache', 'cached_key', jnp.zeros, shape, k_BTGK.dtype)
        cv = self.variable('cache', 'cached_value', jnp.zeros, shape, v_BTGK.dtype)
        cvalid = self.variable('cache', 'cached_valid', jnp.zeros, (b, self.max_len), bool)
        i = index.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_BTGK, (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_BTGK, (0, i, 0, 0))
        valid = jnp.ones((b, t), bool) if kv_valid_BS is None else kv_valid_BS[:, -t:]
        cvalid.value = jax.lax.dynamic_update_slice(cvalid.value, valid, (0, i))
        index.value = i + t
        return ck.value, cv.value, cvalid.value
