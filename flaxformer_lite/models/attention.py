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
                        mask_BTS=None, block_size=128, q_block_size=None):
    """Memory-efficient attention: queries in blocks of `q_block_size` (default
    `Q_BLOCKS * block_size`), keys in blocks of `block_size`, online softmax forward,
    recomputing backward. Equal to `einsum_attention` up to float rounding, except rows
    with no key to attend at all (their output is arbitrary but finite)."""
    b, t, h, kd = q_BTHK.shape
    s, g = k_BSGK.shape[1], k_BSGK.shape[2]
    kblk = min(block_size, s)
    qblk = min(q_block_size or Q_BLOCKS * block_size, t)
    kpad, qpad = (-s) % kblk, (-t) % qblk
    valid = jnp.ones((b, s), bool) if kv_valid_BS is None else jnp.broadcast_to(kv_valid_BS, (b, s))
    k_BSGK = jnp.pad(k_BSGK, ((0, 0), (0, kpad), (0, 0), (0, 0)))
    v_BSGK = jnp.pad(v_BSGK, ((0, 0), (0, kpad), (0, 0), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, kpad)))
    q_BTGRK = jnp.pad(_group(q_BTHK, g), ((0, 0), (0, qpad), (0, 0), (0, 0), (0, 0)))
    # Padded query rows sit at position -1: they never widen a block's causal range.
    q_pos = jnp.pad(jnp.arange(t) + q_offset, (0, qpad), constant_values=-1)
    if mask_BTS is not None:
        mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, qpad), (0, kpad)), constant_values=True)
    out = _flash(causal, qblk, kblk, q_BTGRK, k_BSGK, v_BSGK, valid, q_pos, mask_BTS)
    return out[:, :t].reshape(b, t, h, kd).astype(q_BTHK.dtype)


# Query blocks span this many key blocks by default: large enough that each block pair is
# a sizeable matmul, small enough that skipping whole pairs above the causal diagonal
# saves nearly half of the work (and that a block's scores stay in cache).
Q_BLOCKS = 4


def _blocks(x, blk, axis):
    """Split `axis` into [n, blk] and move the block index to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // blk, blk) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _layout(qblk, kblk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS):
    """Blocked operands: q [nq, B, G, R, qblk, K], k/v [nk, B, G, kblk, K], valid
    [nk, B, kblk], positions [nq, qblk] / [nk, kblk], extra [nq, nk, B|1, qblk, kblk]."""
    qb = _blocks(q_BTGRK.transpose(0, 2, 3, 1, 4), qblk, 3)
    kb = _blocks(k_BSGK.transpose(0, 2, 1, 3), kblk, 2)
    vb = _blocks(v_BSGK.transpose(0, 2, 1, 3), kblk, 2)
    validb = _blocks(valid_BS, kblk, 1)
    qposb = q_pos.reshape(-1, qblk)
    kposb = jnp.arange(k_BSGK.shape[1]).reshape(-1, kblk)
    extrab = None if extra_BTS is None else _blocks(_blocks(extra_BTS, qblk, 1), kblk, 3).swapaxes(0, 1)
    return qb, kb, vb, validb, qposb, kposb, extrab


def _ranges(causal, qposb, kblk, nk):
    """Key blocks [0, hi_i) each query block needs, and the first query block lo_j that
    needs key block j: under a causal mask the blocks above the diagonal are skipped."""
    nq = qposb.shape[0]
    if not causal:
        return jnp.full((nq,), nk, jnp.int32), jnp.zeros((nk,), jnp.int32)
    qmax = qposb.max(-1)  # positions are increasing: block i reaches key qmax_i
    hi = jnp.clip(qmax // kblk + 1, 0, nk).astype(jnp.int32)
    lo = (qmax[None, :] < (jnp.arange(nk) * kblk)[:, None]).sum(-1).astype(jnp.int32)
    return hi, lo


def _scores(causal, qi, kj, qpos_i, kpos_j, valid_j, extra_ij):
    """Masked scores of one query block against one key block: [B, G, R, qblk, kblk]."""
    scores = jnp.einsum('bgrqk,bgsk->bgrqs', qi, kj)
    mask = valid_j[:, None, :]  # [B, 1, kblk]
    if causal:
        mask = mask & (qpos_i[:, None] >= kpos_j[None, :])[None]
    if extra_ij is not None:
        mask = mask & extra_ij
    mask = mask[:, None, None]
    return jnp.where(mask, scores, _NEG), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal, qblk, kblk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS):
    return _flash_fwd(causal, qblk, kblk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS)[0]


def _flash_fwd(causal, qblk, kblk, q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS):
    b, t, g, r, kd = q_BTGRK.shape
    q = q_BTGRK.astype(jnp.float32) / math.sqrt(kd)
    k, v = k_BSGK.astype(jnp.float32), v_BSGK.astype(jnp.float32)
    qb, kb, vb, validb, qposb, kposb, extrab = _layout(qblk, kblk, q, k, v, valid_BS, q_pos, extra_BTS)
    hi, _ = _ranges(causal, qposb, kblk, kb.shape[0])

    def q_block(xs):
        i, qi = xs

        def body(j, carry):
            m, l, acc = carry
            extra = None if extrab is None else extrab[i, j]
            scores, _ = _scores(causal, qi, kb[j], qposb[i], kposb[j], validb[j], extra)
            m_new = jnp.maximum(m, scores.max(-1))
            p = jnp.exp(scores - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum('bgrqs,bgsk->bgrqk', p, vb[j])
            return m_new, l, acc

        init = (jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(qi.shape[:-1], jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, hi[i], body, init)
        return acc / l[..., None], m + jnp.log(l)

    out_b, lse_b = jax.lax.map(q_block, (jnp.arange(qb.shape[0]), qb))  # [nq, B, G, R, qblk, (K)]
    out = jnp.moveaxis(out_b, 0, 3).reshape(b, g, r, t, kd).transpose(0, 3, 1, 2, 4)  # [B, T, G, R, K]
    return out, (q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS, out_b, lse_b)


def _flash_bwd(causal, qblk, kblk, res, d_out_BTGRK):
    q_BTGRK, k_BSGK, v_BSGK, valid_BS, q_pos, extra_BTS, out_b, lse_b = res
    kd = q_BTGRK.shape[-1]
    scale = 1.0 / math.sqrt(kd)
    q = q_BTGRK.astype(jnp.float32) * scale
    k, v = k_BSGK.astype(jnp.float32), v_BSGK.astype(jnp.float32)
    qb, kb, vb, validb, qposb, kposb, extrab = _layout(qblk, kblk, q, k, v, valid_BS, q_pos, extra_BTS)
    dob = _blocks(d_out_BTGRK.astype(jnp.float32).transpose(0, 2, 3, 1, 4), qblk, 3)
    delta_b = (dob * out_b).sum(-1)  # [nq, B, G, R, qblk]
    _, lo = _ranges(causal, qposb, kblk, kb.shape[0])
    nq = qb.shape[0]

    def k_block(dq, xs):
        j, kj, vj = xs

        def body(i, carry):
            dq, dk, dv = carry
            extra = None if extrab is None else extrab[i, j]
            scores, mask = _scores(causal, qb[i], kj, qposb[i], kposb[j], validb[j], extra)
            p = jnp.exp(scores - lse_b[i][..., None])
            dv = dv + jnp.einsum('bgrqs,bgrqk->bgsk', p, dob[i])
            dp = jnp.einsum('bgrqk,bgsk->bgrqs', dob[i], vj)
            ds = jnp.where(mask, p * (dp - delta_b[i][..., None]), 0.0)
            dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + jnp.einsum('bgrqs,bgsk->bgrqk', ds, kj), i, 0)
            dk = dk + jnp.einsum('bgrqs,bgrqk->bgsk', ds, qb[i])
            return dq, dk, dv

        dq, dk, dv = jax.lax.fori_loop(lo[j], nq, body, (dq, jnp.zeros_like(kj), jnp.zeros_like(vj)))
        return dq, (dk, dv)

    dq_b, (dk_b, dv_b) = jax.lax.scan(k_block, jnp.zeros_like(qb), (jnp.arange(kb.shape[0]), kb, vb))

    def unblock_kv(x_b):  # [nk, B, G, kblk, K] -> [B, S, G, K]
        return jnp.moveaxis(x_b, 0, 2).reshape(k_BSGK.shape[0], k_BSGK.shape[2], -1, kd).transpose(0, 2, 1, 3)

    dq = jnp.moveaxis(dq_b, 0, 3).reshape(q.shape[0], q.shape[2], q.shape[3], -1, kd).transpose(0, 3, 1, 2, 4)
    return ((dq * scale).astype(q_BTGRK.dtype), unblock_kv(dk_b).astype(k_BSGK.dtype),
            unblock_kv(dv_b).astype(v_BSGK.dtype), None, None, None)


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
    # Queries times this before the 1/sqrt(head_dim): muP's 1/d attention relative to its
    # base width (`models/mup.py`); 1 skips it.
    query_multiplier: float = 1.0

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
        if self.query_multiplier != 1.0:
            q = q * jnp.asarray(self.query_multiplier, q.dtype)
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
                # Causality by structure alone lets XLA pick a fused kernel (cuDNN flash
                # attention on GPUs) that an explicit [T, S] mask rules out.
                plain_causal = causal and kv_valid_BS is None and mask_BTS is None and not use_cache
                out = (jax.nn.dot_product_attention(q, k, v, is_causal=True) if plain_causal
                       else xla_attention(q, k, v, mask))
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
