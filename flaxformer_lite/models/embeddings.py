"""Token embeddings and positional encodings: sinusoidal (the paper), learned, rotary, none."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.models.layers import Dtype, partitioned

POSITION_KINDS = ('sinusoidal', 'learned', 'rotary', 'none')


class Embed(nn.Module):
    """Token embedding table [vocab, d_model]; `attend` reuses it as the output projection.

    With `scale`, looked-up vectors are multiplied by sqrt(d_model) (the paper, 3.4), so
    that they are not drowned by the positional encoding of unit amplitude. The table is
    initialised with std 1/sqrt(d_model). `scale_width` replaces d_model in both (muP's
    base width, `models/mup.py`: entries and updates of one size at every width).
    """
    vocab_size: int
    d_model: int
    scale: bool = True
    dtype: Dtype = jnp.float32
    scale_width: int | None = None  # default d_model

    @property
    def width(self) -> int:
        """The width of the init's 1/sqrt and the multiplier's sqrt."""
        return self.d_model if self.scale_width is None else self.scale_width

    def setup(self):
        self.embedding = self.param(
            'embedding', partitioned(nn.initializers.normal(stddev=self.width**-0.5), ('vocab', 'embed')),
            (self.vocab_size, self.d_model), jnp.float32)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.dtype)
        return x_BTD * jnp.sqrt(self.width).astype(self.dtype) if self.scale else x_BTD

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits against every token: x @ E^T (shared input/output embeddings)."""
        return jnp.einsum('btd,vd->btv', x_BTD, self.embedding.astype(self.dtype))


def sinusoidal_table(length: int, d_model: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...) (the paper, 3.5)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * -(np.log(10000.0) / d_model))
    table = np.zeros((length, d_model), np.float64)
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div[: d_model // 2])
    return table.astype(np.float32)


class AddPositions(nn.Module):
    """Adds absolute positions (sinusoidal or learned) to x [B, T, D]; rotary and none
    leave x unchanged (rotary acts inside attention, see `apply_rotary`)."""
    kind: str
    max_len: int
    d_model: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        if self.kind in ('rotary', 'none'):
            return x_BTD
        length = x_BTD.shape[1]
        if positions_BT is None:
            positions_BT = jnp.arange(length)[None, :]
        if self.kind == 'sinusoidal':
            # A function, not a parameter: it extends to sequences longer than max_len
            # (evaluation at longer dependency lengths) without changing the model.
            table = jnp.asarray(sinusoidal_table(max(self.max_len, length), self.d_model))
        elif self.kind == 'learned':
            table = self.param('pos_embedding', partitioned(nn.initializers.normal(stddev=0.02), (None, 'embed')),
                               (self.max_len, self.d_model), jnp.float32)
        else:
            raise ValueError(f'unknown positional encoding {self.kind}')
        return x_BTD + jnp.take(table, positions_BT, axis=0).astype(self.dtype)


def apply_rotary(x_BTHK: jax.Array, positions_BT: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) on the last axis of q or k, computed
    in float32. Pairs (x[2i], x[2i+1]) are rotated by the angle pos * base^(-2i/K)."""
    head_dim = x_BTHK.shape[-1]
    assert head_dim % 2 == 0, f'rotary needs an even head dimension, got {head_dim}'
    freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BTK = positions_BT[..., None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle_BTK)[:, :, None, :], jnp.cos(angle_BTK)[:, :, None, :]
    x = x_BTHK.astype(jnp.float32)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x_BTHK.dtype)
