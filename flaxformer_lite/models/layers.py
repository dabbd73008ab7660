"""Building blocks with logical axis names: dense, feed-forward, norms, dropout helpers.

Every parameter is created through `nn.with_logical_partitioning`, so the mapping to a
device mesh is decided by rules in the config (`sharding.py`), never here. Weight axes
(`embed`, `mlp`, `heads`, `kv`, `vocab`) are distinct from activation axes (`act_*`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """`init` whose parameter carries logical axis names `axes`."""
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


def dtype_of(name: str) -> Dtype:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}[name]


class Dense(nn.Module):
    """x @ W (+ b) contracting the trailing `axis` of x with W's leading axes; W has shape
    in_dims + features and carries the logical names `kernel_axes` (one per dimension).

    Written out rather than `nn.DenseGeneral`, whose reshaped kernel loses its logical
    names under a mesh. Glorot-uniform over the flattened fan-in and fan-out, as
    DenseGeneral would use."""
    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(sorted(a % x.ndim for a in axis))
        assert axis == tuple(range(x.ndim - len(axis), x.ndim)), 'contract trailing axes only'
        n_in = len(axis)
        assert len(self.kernel_axes) == n_in + len(features), (self.kernel_axes, axis, features)
        init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=tuple(range(n_in)),
                                                out_axis=tuple(range(n_in, n_in + len(features))))
        kernel = self.param('kernel', partitioned(init, self.kernel_axes),
                            tuple(x.shape[a] for a in axis) + features, jnp.float32)
        # As one 2-D product: XLA:CPU computes the weight gradient of a dot over a 3-D
        # activation several times slower than over the same data flattened.
        lead, fan_in = x.shape[:x.ndim - n_in], math.prod(kernel.shape[:n_in])
        y = jnp.dot(x.reshape(-1, fan_in).astype(self.dtype), kernel.reshape(fan_in, -1).astype(self.dtype))
        y = y.reshape(lead + features)
        if self.use_bias:
            bias = self.param('bias', partitioned(nn.initializers.zeros_init(), self.kernel_axes[n_in:]),
                              features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm (the paper's) or RMSNorm, computed in float32."""
    kind: str = 'layernorm'
    dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale_init = partitioned(nn.initializers.ones_init(), ('embed',))
        if self.kind == 'rmsnorm':
            norm = nn.RMSNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                              scale_init=scale_init, name='rmsnorm')
        elif self.kind == 'layernorm':
            norm = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                                scale_init=scale_init,
                                bias_init=partitioned(nn.initializers.zeros_init(), ('embed',)),
                                name='layernorm')
        else:
            raise ValueError(f'unknown norm {self.kind}')
        return norm(x.astype(jnp.float32)).astype(self.dtype)


class FeedForward(nn.Module):
    """Position-wise feed-forward: relu (the paper's), gelu, or swiglu (gated)."""
    d_model: int
    d_ff: int
    activation: str = 'relu'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        if self.activation == 'swiglu':
            gate = Dense(self.d_ff, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='wi_gate')(x_BTD)
            up = Dense(self.d_ff, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='wi_up')(x_BTD)
            h_BTF = nn.silu(gate) * up
        else:
            act = {'relu': nn.relu, 'gelu': nn.gelu}[self.activation]
            h_BTF = act(Dense(self.d_ff, ('embed', 'mlp'), dtype=self.dtype, name='wi')(x_BTD))
        h_BTF = constrain(h_BTF, ('act_batch', 'act_length', 'act_mlp'))
        use_bias = self.activation != 'swiglu'
        return Dense(self.d_model, ('mlp', 'embed'), use_bias=use_bias, dtype=self.dtype, name='wo')(h_BTF)
