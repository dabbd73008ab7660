"""Causal linear attention as a registry entry (`model.name=linear_attention`).

Per head (d_k = d_v = hidden / num_heads), with a feature map phi and a decay:

  S_t = diag(a_t) S_{t-1} + phi(k_t) v_t^T        state [heads, d_k, d_v], fixed size
  o_t = S_t^T phi(q_t) / d_k^0.5

  model.la_decay     none    a_t = 1 (Katharopoulos et al. 2020)
                     fixed   a_t = gamma_h = 1 - 2^(-5 - h): a fixed per-head exponential decay, as
                             RetNet's (Sun et al. 2023) without its xPos rotation and in this
                             module's layout: linear attention with RetNet's decay, not RetNet
                     gated   a_t = sigmoid(x_t W_down W_up + b)^(1/16), data-dependent per key
                             dimension, low rank 16 (gated linear attention, Yang et al. 2024)
  model.la_feature_map  elu       phi = elu + 1 (positive), normalised as in Katharopoulos et al.:
                                  o_t / (phi(q_t) . z_t), z_t = diag(a_t) z_{t-1} + phi(k_t); z is
                                  carried as one more value column (v_t -> [v_t, 1]), so the state is
                                  [heads, d_k, d_v + 1]
                        identity  phi = id (RetNet's and GLA's): no normaliser (it could vanish), a
                                  per-head RMS norm of o_t instead (their GroupNorm)
  fixed and gated also gate the output, o_t * silu(x_t W_g) (both papers), before W_o.

Training uses the chunked parallel form (`chunked_attention`, `model.chunk_size`
tokens per chunk): attention-like products inside a chunk and the state passed
between chunks, one `lax.scan` step per chunk. Decoding uses the recurrent form
(`recurrent_step`). Every decay factor is exp of a difference of cumulative log
decays that is <= 0, so no chunk size overflows.

FLOPs (accounting's convention): the projections per token, plus the recurrent form's
state products per token and layer, each of its own widths like attention's: the
outer product phi(k_t) v_t^T and the read-out phi(q_t)^T S_t, heads * d_k * d_v' MACs
each (d_v' = d_v + 1 with the elu normaliser). The decay (diag(a_t) S) is elementwise
and, like the chunked form's extra intra-chunk work, is not counted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.models.layers import Dense, constrain, dtype_of, partitioned
from flaxformer_lite.models.fixed_state import FixedStateConfig
from flaxformer_lite.models.fixed_state_family import Mixer, make_family

GATE_RANK = 16  # GLA's low-rank gate projection
GATE_TEMPERATURE = 16.0  # GLA's tau: a_t = sigmoid(.)^(1/tau) keeps the gates near 1 at init
EPS = 1e-6


def chunked_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHV: jax.Array, logd_BTHG: jax.Array,
                      chunk: int) -> jax.Array:
    """o_t = S_t^T q_t for all t (float32): within a chunk as masked attention with the
    pairwise decays exp(b_t - b_s) (b: inclusive cumulative log decay from the chunk's
    start), across chunks through the state. `logd` is [B, T, H, 1] (a scalar decay
    per head) or [B, T, H, K] (per key dimension). The sequence is padded to whole
    chunks with zero keys and values (which leave the state unchanged) and cut back."""
    b, t, h, kd = q_BTHK.shape
    vd, g = v_BTHV.shape[-1], logd_BTHG.shape[-1]
    c = min(chunk, t)
    n = -(-t // c)

    def blocks(a):  # [B, T, H, X] -> [N, B, H, C, X]
        a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, n * c - t), (0, 0), (0, 0)))
        return a.reshape(b, n, c, h, a.shape[-1]).transpose(1, 0, 3, 2, 4)

    q, k, v, cum = blocks(q_BTHK), blocks(k_BTHK), blocks(v_BTHV), jnp.cumsum(blocks(logd_BTHG), axis=3)
    causal = jnp.tril(jnp.ones((c, c), bool))[..., None]  # [C_t, C_s, 1]

    def body(s_BHKV, xs):
        q, k, v, cum = xs  # [B, H, C, X]
        diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, H, C_t, C_s, G]
        decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
        if g == 1:
            scores = jnp.einsum('bhtk,bhsk->bhts', q, k) * decay[..., 0]
        else:
            scores = jnp.einsum('bhtk,bhsk,bhtsk->bhts', q, k, decay)
        o = jnp.einsum('bhts,bhsv->bhtv', scores, v) + jnp.einsum('bhtk,bhkv->bhtv', q * jnp.exp(cum), s_BHKV)
        last = cum[:, :, -1]  # [B, H, G]
        s_BHKV = (jnp.exp(last)[..., None] * s_BHKV
                  + jnp.einsum('bhsk,bhsv->bhkv', k * jnp.exp(last[:, :, None] - cum), v))
        return s_BHKV, o

    _, o = jax.lax.scan(body, jnp.zeros((b, h, kd, vd), jnp.float32), (q, k, v, cum))
    return o.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, vd)[:, :t]


def recurrent_step(s_BHKV: jax.Array, q_BHK: jax.Array, k_BHK: jax.Array, v_BHV: jax.Array,
                   logd_BHG: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token of the recurrence: S = diag(a) S + k v^T, o = S^T q -> (S, o_BHV)."""
    s_BHKV = jnp.exp(logd_BHG)[..., None] * s_BHKV + k_BHK[..., :, None] * v_BHV[..., None, :]
    return s_BHKV, jnp.einsum('bhk,bhkv->bhv', q_BHK, s_BHKV)


def fixed_log_decay(num_heads: int) -> np.ndarray:
    """log gamma_h, gamma_h = 1 - 2^(-5 - h) (RetNet's gammas): memories from ~32 to
    ~2^(4 + H) tokens."""
    return np.log(1.0 - 2.0 ** (-5.0 - np.arange(num_heads))).astype(np.float32)


class LinearAttention(nn.Module):
    """The mixer: projections [embed -> heads x kv], the recurrence, W_o [heads x kv -> embed]."""
    cfg: FixedStateConfig

    def setup(self):
        c = self.cfg
        dt = dtype_of(c.dtype)
        heads = (c.num_heads, c.head_dim)
        self.query = Dense(heads, ('embed', 'heads', 'kv'), use_bias=False, dtype=dt)
        self.key = Dense(heads, ('embed', 'heads', 'kv'), use_bias=False, dtype=dt)
        self.value = Dense(heads, ('embed', 'heads', 'kv'), use_bias=False, dtype=dt)
        self.out = Dense(c.hidden, ('heads', 'kv', 'embed'), axis=(-2, -1), use_bias=False, dtype=dt)
        if c.la_decay != 'none':
            self.output_gate = Dense(heads, ('embed', 'heads', 'kv'), use_bias=False, dtype=dt)
        if c.la_decay == 'gated':
            self.gate_down = Dense(GATE_RANK, ('embed', None), use_bias=False, dtype=dt)
            self.gate_up = Dense(heads, (None, 'heads', 'kv'), dtype=dt)
        if c.la_feature_map == 'identity':
            self.scale = self.param('scale', partitioned(nn.initializers.ones_init(), ('heads', 'kv')), heads,
                                    jnp.float32)

    def _inputs(self, x):
        """x [..., D] -> phi(q) / d_k^0.5, phi(k), v (with the normaliser's column of ones),
        log decay [..., H, 1 | K]; float32."""
        c = self.cfg
        q, k, v = (f(x).astype(jnp.float32) for f in (self.query, self.key, self.value))
        if c.la_feature_map == 'elu':
            q, k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
        q = q * c.head_dim ** -0.5
        if c.la_decay == 'none':
            logd = jnp.zeros(q.shape[:-1] + (1,), jnp.float32)
        elif c.la_decay == 'fixed':
            logd = jnp.broadcast_to(jnp.asarray(fixed_log_decay(c.num_heads))[:, None], q.shape[:-1] + (1,))
        else:
            logd = jax.nn.log_sigmoid(self.gate_up(self.gate_down(x)).astype(jnp.float32)) / GATE_TEMPERATURE
        return q, k, v, logd

    def _output(self, o, x):
        """Normalise (elu: by phi(q) . z; identity: per-head RMS norm), gate, project."""
        c = self.cfg
        if c.la_feature_map == 'elu':
            o = o[..., :-1] / (o[..., -1:] + EPS)
        else:
            o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + EPS) * self.scale
        if c.la_decay != 'none':
            o = o * jax.nn.silu(self.output_gate(x).astype(jnp.float32))
        return self.out(o.astype(dtype_of(c.dtype)))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        q, k, v, logd = self._inputs(x_BTD)
        q = constrain(q, ('act_batch', 'act_length', 'act_heads', None))
        o_BTHV = chunked_attention(q, k, v, logd, self.cfg.chunk_size)
        return self._output(constrain(o_BTHV, ('act_batch', 'act_length', 'act_heads', None)), x_BTD)

    def step(self, state: dict, x_BD: jax.Array) -> tuple[jax.Array, dict]:
        s, o = recurrent_step(state['S'], *self._inputs(x_BD))
        return self._output(o, x_BD), {'S': s}

    def zero_state(self, batch: int) -> dict:
        c = self.cfg
        return {'S': jnp.zeros((batch, c.num_heads, c.head_dim, _value_width(c)), jnp.float32)}


def _value_width(c: FixedStateConfig) -> int:
    return c.head_dim + (1 if c.la_feature_map == 'elu' else 0)


def param_count(c: FixedStateConfig) -> int:
    d, a = c.hidden, c.num_heads * c.head_dim
    n = 4 * d * a  # W_q, W_k, W_v, W_o
    n += d * a if c.la_decay != 'none' else 0  # output gate
    n += d * GATE_RANK + GATE_RANK * a + a if c.la_decay == 'gated' else 0
    return n + (a if c.la_feature_map == 'identity' else 0)


def forward_macs(c: FixedStateConfig) -> int:
    d, a = c.hidden, c.num_heads * c.head_dim
    macs = (5 if c.la_decay != 'none' else 4) * d * a
    macs += d * GATE_RANK + GATE_RANK * a if c.la_decay == 'gated' else 0
    return macs + 2 * state_floats(c)  # k v^T and q^T S, heads * d_k * d_v' each


def state_floats(c: FixedStateConfig) -> int:
    return c.num_heads * c.head_dim * _value_width(c)


MIXER = Mixer(name='linear_attention', module=LinearAttention, param_count=param_count, forward_macs=forward_macs,
              state_floats=state_floats,
              choices=dict(la_feature_map=('elu', 'identity'), la_decay=('none', 'fixed', 'gated')),
              positive=('chunk_size', 'num_heads'), quantum=lambda m: m['num_heads'],
              renamed=dict(la_decay=dict(retnet='fixed')))
LINEAR_ATTENTION = make_family(MIXER)
