"""minGRU as a registry entry (`model.name=mingru`): Feng et al. (2024), "Were RNNs All
We Needed?". The gates read x_t only, so the recurrence is linear in h:

  z_t = sigmoid(x_t W_z + b_z),   h~_t = g(x_t W_h + b_h),   g(a) = a + 1/2 (a >= 0), sigmoid(a) (a < 0)
  h_t = (1 - z_t) h_{t-1} + z_t h~_t                       state [H'], H' = mingru_expand * hidden

g keeps h~ > 0, so training runs a log-space parallel scan (the paper's, after Heinsen
2023): with log a_t = -softplus(k_t) = log(1 - z_t) and log b_t = -softplus(-k_t) +
log g(h~pre_t), each step is the map h -> exp(log a_t) h + exp(log b_t), and an
associative scan composes these maps in log space (h_0 = 0). The paper's form, a running
sum a*_t of log a then logcumsumexp(log b - a*) + a*, subtracts large numbers and drifts
from the step-by-step recurrence by ~1e-3 at 4,096 tokens in float32; the composed form
stays within ~1e-6 (tests/test_mingru_precision.py);
decoding steps the recurrence. With mingru_expand > 1 a projection W_o [H' -> hidden]
follows (as in the authors' code), and the block is pre-norm residual with a channel
mixer (model.mlp_expand).

FLOPs (accounting's convention): the projections per token; the scan's updates are
elementwise (O(H') per token) and not counted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models.layers import Dense, constrain, dtype_of
from flaxformer_lite.models.fixed_state import FixedStateConfig
from flaxformer_lite.models.fixed_state_family import Mixer, make_family


def g(a: jax.Array) -> jax.Array:
    """The paper's positive activation for h~ (continuous, g(0) = 1/2)."""
    return jnp.where(a >= 0, a + 0.5, jax.nn.sigmoid(a))


def log_g(a: jax.Array) -> jax.Array:
    """log g(a), computed stably on both branches."""
    return jnp.where(a >= 0, jnp.log(jax.nn.relu(a) + 0.5), -jax.nn.softplus(-a))


def _compose(first: tuple[jax.Array, jax.Array], then: tuple[jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array]:
    """Two affine maps h -> exp(A) h + exp(B) in log space, `first` applied first: the
    result is (A1 + A2, logaddexp(B1 + A2, B2)). Every term is a log of something
    the recurrence really holds (a decay over a span, a state), so nothing large cancels."""
    a1, b1 = first
    a2, b2 = then
    return a1 + a2, jnp.logaddexp(b1 + a2, b2)


def parallel_scan_log(k_BTH: jax.Array, pre_BTH: jax.Array) -> jax.Array:
    """h_t for every t from a zero state, in log space: [B, T, H'] float32.

    Why pairs: the closed form a*_t + logcumsumexp(log b - a*) subtracts the running
    sum a*_t = sum log a_s, which grows like t, so at T in the thousands float32 loses
    ~1e-3 of h. An associative scan of the step maps (`_compose`) never forms a*, and
    stays within ~1e-6 of the float64 recurrence at any length.
    """
    log_a = -jax.nn.softplus(k_BTH)
    log_b = -jax.nn.softplus(-k_BTH) + log_g(pre_BTH)
    _, log_h = jax.lax.associative_scan(_compose, (log_a, log_b), axis=1)
    return jnp.exp(log_h)


def inner_width(c: FixedStateConfig) -> int:
    return c.mingru_expand * c.hidden


class MinGRU(nn.Module):
    """The mixer: [W_z; W_h] as one product (gate axis unsharded, units over 'mlp')."""
    cfg: FixedStateConfig

    def setup(self):
        c = self.cfg
        dt = dtype_of(c.dtype)
        self.gates = Dense((2, inner_width(c)), ('embed', None, 'mlp'), dtype=dt)
        self.out = Dense(c.hidden, ('mlp', 'embed'), use_bias=False, dtype=dt) if c.mingru_expand > 1 else None

    def _project(self, x):
        kh = self.gates(x).astype(jnp.float32)
        return kh[..., 0, :], kh[..., 1, :]

    def _output(self, h):
        return h if self.out is None else self.out(h.astype(dtype_of(self.cfg.dtype)))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        k_BTH, pre_BTH = self._project(x_BTD)
        h_BTH = constrain(parallel_scan_log(k_BTH, pre_BTH), ('act_batch', 'act_length', 'act_mlp'))
        return self._output(h_BTH).astype(dtype_of(self.cfg.dtype))

    def step(self, state: dict, x_BD: jax.Array) -> tuple[jax.Array, dict]:
        k_BH, pre_BH = self._project(x_BD)
        z = jax.nn.sigmoid(k_BH)
        h_BH = (1.0 - z) * state['h'] + z * g(pre_BH)
        return self._output(h_BH).astype(dtype_of(self.cfg.dtype)), {'h': h_BH}

    def zero_state(self, batch: int) -> dict:
        return {'h': jnp.zeros((batch, inner_width(self.cfg)), jnp.float32)}


def param_count(c: FixedStateConfig) -> int:
    d, h = c.hidden, inner_width(c)
    return 2 * (d * h + h) + (h * d if c.mingru_expand > 1 else 0)


def forward_macs(c: FixedStateConfig) -> int:
    d, h = c.hidden, inner_width(c)
    return 2 * d * h + (h * d if c.mingru_expand > 1 else 0)


def state_floats(c: FixedStateConfig) -> int:
    return inner_width(c)


MIXER = Mixer(name='mingru', module=MinGRU, param_count=param_count, forward_macs=forward_macs,
              state_floats=state_floats, positive=('mingru_expand',))
MINGRU = make_family(MIXER)
