"""Mamba as a registry entry (`model.name=mamba`): the selective state-space block of
Gu and Dao (2023), stacked pre-norm residual with no channel mixer (the paper's; set
`model.mlp_expand` > 0 to add one).

With E = ssm_expand * hidden channels, N = ssm_state, R = ceil(hidden / 16):

  [x; z] = u W_in                                  [B, T, 2, E]
  x = silu(causal depthwise conv_w(x) + b)         width w = ssm_conv
  [d; B; C] = x W_x                                 Delta's low rank R, B_t, C_t in R^N: input-dependent
  Delta = softplus(d W_dt + b_dt)                   per channel; b_dt so that Delta starts in [1e-3, 1e-1]
  A = -exp(A_log)                                   diagonal, negative; S4D-real init A_log = log(1..N)
  h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t    per channel, state [E, N] (ZOH for A, Euler for B)
  y_t = C_t . h_t + D x_t,   out = (y * silu(z)) W_out

Training runs the linear recurrence h_t = a_t h_{t-1} + b_t with
`jax.lax.associative_scan` over the sequence; decoding steps it, carrying the state
(the last w - 1 conv inputs and h).

FLOPs (accounting's convention): the four projections per token, plus the state's
products of its own widths per token and layer: Delta_t B_t x_t (an outer product,
E * N MACs) and the read-out C_t . h_t (E * N). The depthwise convolution (w * E per
token), exp(Delta A) and the scan's multiply-adds are elementwise and not counted.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models.layers import Dense, constrain, dtype_of, partitioned
from flaxformer_lite.models.fixed_state import FixedStateConfig
from flaxformer_lite.models.fixed_state_family import Mixer, make_family

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # the paper's range for Delta at initialisation


def inner_width(c: FixedStateConfig) -> int:
    return c.ssm_expand * c.hidden


def dt_rank(c: FixedStateConfig) -> int:
    return math.ceil(c.hidden / 16)


def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A = -(1, 2, ..., N) in every channel."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=dtype)), shape)


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """softplus^-1 of Delta drawn log-uniformly in [DT_MIN, DT_MAX]."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = jnp.maximum(dt, DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


def _combine(earlier, later):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


class Mamba(nn.Module):
    """The mixer; inner channels are 'mlp' (tensor-parallel like a feed-forward layer)."""
    cfg: FixedStateConfig

    def setup(self):
        c = self.cfg
        dt = dtype_of(c.dtype)
        e, n, r, w = inner_width(c), c.ssm_state, dt_rank(c), c.ssm_conv
        f32 = jnp.float32
        self.in_proj = Dense((2, e), ('embed', None, 'mlp'), use_bias=False, dtype=dt)
        conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=0, out_axis=1)
        self.conv_kernel = self.param('conv_kernel', partitioned(conv_init, (None, 'mlp')), (w, e), f32)
        self.conv_bias = self.param('conv_bias', partitioned(nn.initializers.zeros_init(), ('mlp',)), (e,), f32)
        self.x_proj = Dense(r + 2 * n, ('mlp', None), use_bias=False, dtype=dt)
        self.dt_proj = Dense(e, (None, 'mlp'), use_bias=False, dtype=dt)
        self.dt_bias = self.param('dt_bias', partitioned(_dt_bias_init, ('mlp',)), (e,), f32)
        self.A_log = self.param('A_log', partitioned(_a_log_init, ('mlp', None)), (e, n), f32)
        self.D = self.param('D', partitioned(nn.initializers.ones_init(), ('mlp',)), (e,), f32)
        self.out_proj = Dense(c.hidden, ('mlp', 'embed'), use_bias=False, dtype=dt)

    def _select(self, x):
        """x [..., E] -> Delta [..., E], B and C [..., N] (float32)."""
        c = self.cfg
        r, n = dt_rank(c), c.ssm_state
        dbc = self.x_proj(x.astype(dtype_of(c.dtype))).astype(jnp.float32)
        delta = jax.nn.softplus(self.dt_proj(dbc[..., :r].astype(dtype_of(c.dtype))).astype(jnp.float32)
                                + self.dt_bias)
        return delta, dbc[..., r:r + n], dbc[..., r + n:]

    def _split(self, u):
        xz = self.in_proj(u).astype(jnp.float32)
        return xz[..., 0, :], xz[..., 1, :]

    def _out(self, y, x, z):
        y = (y + self.D * x) * jax.nn.silu(z)
        return self.out_proj(y.astype(dtype_of(self.cfg.dtype)))

    def __call__(self, u_BTD: jax.Array) -> jax.Array:
        x_BTE, z_BTE = self._split(u_BTD)
        t, w = x_BTE.shape[1], self.cfg.ssm_conv
        padded = jnp.pad(x_BTE, ((0, 0), (w - 1, 0), (0, 0)))
        conv = sum(padded[:, j:j + t] * self.conv_kernel[j] for j in range(w))
        x_BTE = constrain(jax.nn.silu(conv + self.conv_bias), ('act_batch', 'act_length', 'act_mlp'))
        delta_BTE, b_BTN, c_BTN = self._select(x_BTE)
        a_BTEN = jnp.exp(delta_BTE[..., None] * -jnp.exp(self.A_log))
        bx_BTEN = (delta_BTE * x_BTE)[..., None] * b_BTN[:, :, None, :]
        _, h_BTEN = jax.lax.associative_scan(_combine, (a_BTEN, bx_BTEN), axis=1)
        return self._out(jnp.einsum('bten,btn->bte', h_BTEN, c_BTN), x_BTE, z_BTE)

    def step(self, state: dict, u_BD: jax.Array) -> tuple[jax.Array, dict]:
        x_BE, z_BE = self._split(u_BD)
        window_BWE = jnp.concatenate([state['conv'], x_BE[:, None]], axis=1)
        x_BE = jax.nn.silu((window_BWE * self.conv_kernel).sum(1) + self.conv_bias)
        delta_BE, b_BN, c_BN = self._select(x_BE)
        h_BEN = (jnp.exp(delta_BE[..., None] * -jnp.exp(self.A_log)) * state['ssm']
                 + (delta_BE * x_BE)[..., None] * b_BN[:, None, :])
        y_BE = jnp.einsum('ben,bn->be', h_BEN, c_BN)
        return self._out(y_BE, x_BE, z_BE), {'conv': window_BWE[:, 1:], 'ssm': h_BEN}

    def zero_state(self, batch: int) -> dict:
        c = self.cfg
        e = inner_width(c)
        return {'conv': jnp.zeros((batch, c.ssm_conv - 1, e), jnp.float32),
                'ssm': jnp.zeros((batch, e, c.ssm_state), jnp.float32)}


def param_count(c: FixedStateConfig) -> int:
    d, e, n, r, w = c.hidden, inner_width(c), c.ssm_state, dt_rank(c), c.ssm_conv
    return 2 * d * e + (w * e + e) + e * (r + 2 * n) + (r * e + e) + e * n + e + e * d


def forward_macs(c: FixedStateConfig) -> int:
    d, e, n, r = c.hidden, inner_width(c), c.ssm_state, dt_rank(c)
    return 2 * d * e + e * (r + 2 * n) + r * e + e * d + 2 * e * n  # + Delta B x and C . h


def state_floats(c: FixedStateConfig) -> int:
    e = inner_width(c)
    return e * c.ssm_state + (c.ssm_conv - 1) * e


MIXER = Mixer(name='mamba', module=Mamba, param_count=param_count, forward_macs=forward_macs,
              state_floats=state_floats, defaults=dict(mlp_expand=0),
              positive=('ssm_state', 'ssm_conv', 'ssm_expand'))
MAMBA = make_family(MIXER)
