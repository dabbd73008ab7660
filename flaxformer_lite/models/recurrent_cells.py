"""Recurrent cells (Elman RNN, LSTM, GRU) as objects, and the recurrent layers over a
whole sequence: the plain one, and Bahdanau's with attention inside the recurrence.

Each cell kind is one frozen dataclass (`RNNCell`, `LSTMCell`, `GRUCell`) holding
everything that differs between kinds: gates, carry size, the step and its hand-written
VJP, the bias init, the parameters and their count, the flat recurrent weight.
`cell_kind` maps the config's name ('rnn' | 'lstm' | 'gru') to its object. The loop over
time, with its fast backward pass, lives in `recurrence.py`.

Weights are stored gate-major, [in, gates, hidden], so that sharding the hidden axis
('mlp') keeps every gate of a unit on one device; the gate axis is never sharded (None).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models.layers import Dtype, partitioned
from flaxformer_lite.models.recurrence import (Carry, RecurrentWeights, fused_recurrence, recurrent_product,
                                               scan_recurrence)

Params = tuple  # (w_ih [D, G, H], w_hh [H, G, H], bias [G, H], b_hn [H] | None)
MASKED_SCORE = -1e30  # an attention score that softmax turns into an exact zero weight

# Per-gate Glorot for the input kernels (the gate axis is a batch axis of the init).
input_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=2,
                                              batch_axis=(1,))


def recurrent_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """One orthogonal [H, H] matrix per gate: keeps the state's norm at initialisation.
    One unbatched QR per gate, on purpose: jaxlib's batched QR spreads the batch over the
    intra-op thread pool and, with two of them running at once on a 2-thread pool
    (two layers' inits), both threads wait on each other (a deadlock seen here)."""
    h, g, h2 = shape
    keys = jax.random.split(key, g)
    return jnp.stack([nn.initializers.orthogonal()(k, (h, h2), dtype) for k in keys], axis=1)


@dataclasses.dataclass(frozen=True)
class Cell(abc.ABC):
    """A cell kind: the step from the input pre-activations gx = x W_ih + b and the
    recurrent ones rec = h W_hh (+ b_hn on the GRU candidate), both [B, gates * H]
    gate-major, and what its parameters look like. The defaults suit a one-carry cell."""
    name: ClassVar[str]
    num_gates: ClassVar[int]
    carry_size: ClassVar[int] = 1  # (h,) or (h, c)
    saves_in_place: ClassVar[bool] = False  # see `recurrence.StepCell`
    backward_reads_new: ClassVar[bool] = True

    @abc.abstractmethod
    def forward(self, gx_BG: jax.Array, rec_BG: jax.Array, carry: Carry) -> tuple[Carry, jax.Array | None]:
        """-> (new carry, the activations `backward` needs)."""

    @abc.abstractmethod
    def backward(self, saved: jax.Array | None, prev: Carry, new: Carry | None,
                 d_new: Carry) -> tuple[jax.Array | None, jax.Array, Carry]:
        """The VJP of `forward` from its saved activations and the carries entering
        (`prev`) and leaving (`new`) the step: -> (d_gx, d_rec, d_prev). Written out (the
        gate activations are not recomputed; autodiff of the gate slices would also sum
        padded arrays) because it is the body of the backward time loop. d_gx is None where it equals d_rec (both enter as gx + rec)."""

    def update(self, gx_BG: jax.Array, rec_BG: jax.Array, carry: Carry) -> Carry:
        """`forward` without the saved activations (the plain cell)."""
        return self.forward(gx_BG, rec_BG, carry)[0]

    def zero_carry(self, batch: int, hidden: int) -> Carry:
        return tuple(jnp.zeros((batch, hidden), jnp.float32) for _ in range(self.carry_size))

    def bias_init(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        return jnp.zeros(shape, dtype)

    def params(self, module: nn.Module, in_features: int, hidden: int) -> Params:
        """Create (w_ih [D, G, H], w_hh [H, G, H], bias [G, H], b_hn [H] | None) on `module`.

        Logical axes: the input dimension (model input or the previous state) is 'embed',
        the hidden/output dimension 'mlp' (tensor-parallel like a feed-forward layer), the
        gate axis None (never sharded: a unit's gates stay together)."""
        g = self.num_gates
        f32 = jnp.float32
        w_ih = module.param('w_ih', partitioned(input_init, ('embed', None, 'mlp')), (in_features, g, hidden), f32)
        w_hh = module.param('w_hh', partitioned(recurrent_init, ('embed', None, 'mlp')), (hidden, g, hidden), f32)
        bias = module.param('bias', partitioned(self.bias_init, (None, 'mlp')), (g, hidden), f32)
        return w_ih, w_hh, bias, None

    def param_count(self, in_features: int, hidden: int) -> int:
        return self.num_gates * (in_features * hidden + hidden * hidden + hidden)

    def flat_recurrent(self, w_hh_HGH: jax.Array, b_hn_H: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """The recurrent weight as one [H, G*H] matrix and the bias inside the recurrent
        product (the GRU candidate's only)."""
        h, g, _ = w_hh_HGH.shape
        return w_hh_HGH.reshape(h, g * h), None


@dataclasses.dataclass(frozen=True)
class RNNCell(Cell):
    """h' = tanh(gx + rec); saves nothing (h' is the carry)."""
    name: ClassVar[str] = 'rnn'
    num_gates: ClassVar[int] = 1

    def forward(self, gx_BG, rec_BG, carry):
        return (jnp.tanh(gx_BG + rec_BG),), None

    def backward(self, saved, prev, new, d_new):
        dh = d_new[0]
        return None, dh * (1.0 - new[0] * new[0]), (jnp.zeros_like(dh),)


def _gate(z: jax.Array, k: int, h: int) -> jax.Array:
    return z[..., k * h:(k + 1) * h]


@dataclasses.dataclass(frozen=True)
class LSTMCell(Cell):
    """i, f, g, o = gx + rec;  c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c').
    Saves s(i), s(f), tanh(g), s(o): as wide as gx, so it saves in place."""
    name: ClassVar[str] = 'lstm'
    num_gates: ClassVar[int] = 4
    carry_size: ClassVar[int] = 2
    saves_in_place: ClassVar[bool] = True

    @staticmethod
    def _columns(h: int) -> tuple[jax.Array, jax.Array]:
        """Per-column (a, b) of the activations a * tanh(a * x) + b: sigmoid gates i, f, o
        (a = b = 1/2) and the tanh candidate g (a = 1, b = 0), gate-major [4H]."""
        a = jnp.repeat(jnp.array([0.5, 0.5, 1.0, 0.5], jnp.float32), h)
        return a, jnp.where(a == 0.5, 0.5, 0.0).astype(jnp.float32)

    def forward(self, gx_BG, rec_BG, carry):
        h = carry[0].shape[-1]
        # All four activations in one elementwise pass over [B, 4H]: s(x) = (1 + tanh(x / 2)) / 2,
        # so every column is a * tanh(a * x) + b with a = 1/2, b = 1/2 (i, f, o) or a = 1, b = 0 (g).
        a, b = self._columns(h)
        act = a * jnp.tanh(a * (gx_BG + rec_BG)) + b
        i, f, g, o = (_gate(act, k, h) for k in range(4))
        c = f * carry[1] + i * g
        return (o * jnp.tanh(c), c), act

    def backward(self, saved, prev, new, d_new):
        dh = d_new[0]
        h = dh.shape[-1]
        i, f, g, o = (_gate(saved, k, h) for k in range(4))
        tc = jnp.tanh(new[1])
        dc = d_new[1] + dh * o * (1.0 - tc * tc)
        # d act / dz of a * tanh(a * z) + b is a^2 - (act - b)^2 (s(1 - s), or 1 - g^2): one
        # pass over [B, 4H], and a product the gate-split dot rewrite does not apply to.
        a, b = self._columns(h)
        upstream = jnp.concatenate([dc * g, dc * prev[1], dc * i, dh * tc], axis=-1)
        dz = upstream * (a * a - jnp.square(saved - b))
        return None, dz, (jnp.zeros_like(dh), dc * f)

    def bias_init(self, key, shape, dtype=jnp.float32):
        # forget gate open (Jozefowicz et al. 2015)
        return super().bias_init(key, shape, dtype).at[1].set(1.0)


@dataclasses.dataclass(frozen=True)
class GRUCell(Cell):
    """r = s(gx_r + rec_r), z = s(gx_z + rec_z), n = tanh(gx_n + r * rec_n),
    h' = (1 - z) n + z h: the cuDNN / PyTorch form (reset applied after W_hn, which lets
    all three recurrent products be one matrix product). Saves r, z, n, rec_n."""
    name: ClassVar[str] = 'gru'
    num_gates: ClassVar[int] = 3
    backward_reads_new: ClassVar[bool] = False

    def forward(self, gx_BG, rec_BG, carry):
        h = carry[0].shape[-1]
        r = jax.nn.sigmoid(_gate(gx_BG, 0, h) + _gate(rec_BG, 0, h))
        u = jax.nn.sigmoid(_gate(gx_BG, 1, h) + _gate(rec_BG, 1, h))
        n = jnp.tanh(_gate(gx_BG, 2, h) + r * _gate(rec_BG, 2, h))
        return ((1.0 - u) * n + u * carry[0],), jnp.concatenate([r, u, n, _gate(rec_BG, 2, h)], axis=-1)

    def backward(self, saved, prev, new, d_new):
        dh = d_new[0]
        h = dh.shape[-1]
        r, u, n, rec_n = (_gate(saved, k, h) for k in range(4))
        dzn = dh * (1.0 - u) * (1.0 - n * n)
        dzr = dzn * rec_n * r * (1.0 - r)
        dzu = dh * (prev[0] - n) * u * (1.0 - u)
        return (jnp.concatenate([dzr, dzu, dzn], axis=-1), jnp.concatenate([dzr, dzu, dzn * r], axis=-1),
                (dh * u,))

    def params(self, module, in_features, hidden):
        w_ih, w_hh, bias, _ = super().params(module, in_features, hidden)
        # the candidate's recurrent bias sits inside r * (.), so it is its own parameter
        b_hn = module.param('b_hn', partitioned(nn.initializers.zeros_init(), ('mlp',)), (hidden,), jnp.float32)
        return w_ih, w_hh, bias, b_hn

    def param_count(self, in_features, hidden):
        return super().param_count(in_features, hidden) + hidden

    def flat_recurrent(self, w_hh_HGH, b_hn_H):
        w_HG, _ = super().flat_recurrent(w_hh_HGH, b_hn_H)
        h = w_hh_HGH.shape[0]
        return w_HG, jnp.concatenate([jnp.zeros((2 * h,), jnp.float32), b_hn_H])


CELL_KINDS: dict[str, Cell] = {c.name: c for c in (RNNCell(), GRUCell(), LSTMCell())}
CELLS = tuple(CELL_KINDS)  # the config's names: rnn | gru | lstm
# Per-name views for callers that hold the config's string.
def cell_kind(name: str) -> Cell:
    """The cell object of a config name ('rnn' | 'lstm' | 'gru')."""
    if name not in CELL_KINDS:
        raise ValueError(f'unknown cell {name!r}; expected one of {", ".join(CELLS)}')
    return CELL_KINDS[name]


def cell_param_count(cell: str, in_features: int, hidden: int) -> int:
    """Parameters of one cell of the named kind (`Cell.param_count`)."""
    return cell_kind(cell).param_count(in_features, hidden)


def matmul(x_ND: jax.Array, w_DK: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """x @ w over the last axis of x, as one 2-D product (float32 result). Why 2-D: on
    XLA:CPU the weight gradient of a dot over a 3-D activation contracts two axes and
    runs ~3x slower than the same product on the flattened [N, D] array."""
    lead = x_ND.shape[:-1]
    y = jnp.dot(x_ND.reshape(-1, x_ND.shape[-1]).astype(dtype), w_DK.astype(dtype),
                preferred_element_type=jnp.float32)
    return y.reshape(*lead, w_DK.shape[-1])


class RecurrentLayer(nn.Module):
    """One direction of one recurrent layer over a time-major sequence.

    `__call__` is the fast form (hoisted input projection + scan); `step` is the plain
    cell, one token at a time, used for decoding (and as the reference in tests).
    """
    cell: str  # rnn | lstm | gru
    in_features: int
    hidden: int
    dtype: Dtype = jnp.float32
    unroll: int = 1
    fused: bool = True  # custom-VJP recurrence; False: plain scan + autodiff

    def setup(self):
        self.kind = cell_kind(self.cell)
        self.w_ih, self.w_hh, self.bias, self.b_hn = self.kind.params(self, self.in_features, self.hidden)

    def project(self, x_TBD: jax.Array) -> jax.Array:
        """Input products of every step in one matrix product: [T, B, G*H] float32 (or of
        one step: [B, D] -> [B, G*H]); the bias is added by the caller."""
        d, g, h = self.w_ih.shape
        return matmul(x_TBD, self.w_ih.reshape(d, g * h), self.dtype)

    def project_table(self, table_VD: jax.Array, tokens_TB: jax.Array) -> jax.Array:
        """`project(table[tokens])` computed as `(table @ W_ih)[tokens]`: when the inputs are
        rows of an embedding table with fewer rows than the batch has tokens, projecting
        the table is the smaller product (and its gradient a scatter of rows)."""
        d, g, h = self.w_ih.shape
        return jnp.take(matmul(table_VD, self.w_ih.reshape(d, g * h), self.dtype), tokens_TB, axis=0)

    def __call__(self, x_TBD: jax.Array | None, carry0: Carry | None = None, mask_TB: jax.Array | None = None,
                 *, reverse: bool = False, gx_TBG: jax.Array | None = None) -> tuple[jax.Array, Carry]:
        """-> (h_TBH, final carry). `reverse` reads the sequence backwards (outputs stay
        aligned with the inputs); with a mask, pads are skipped in either direction.
        `gx_TBG` replaces the input projection (x_TBD is then unused)."""
        gx_TBG = self.project(x_TBD) if gx_TBG is None else gx_TBG
        if carry0 is None:
            carry0 = self.kind.zero_carry(gx_TBG.shape[1], self.hidden)
        if reverse:
            gx_TBG = gx_TBG[::-1]
            mask_TB = None if mask_TB is None else mask_TB[::-1]
        w_hh, b_rec = self.kind.flat_recurrent(self.w_hh, self.b_hn)
        weights = RecurrentWeights(self.bias.reshape(-1), w_hh, b_rec)
        run = fused_recurrence if self.fused else scan_recurrence
        h_TBH, final = run(self.kind, gx_TBG, weights, tuple(carry0), mask_TB, unroll=self.unroll)
        return (h_TBH[::-1] if reverse else h_TBH), final

    def step(self, carry: Carry, x_BD: jax.Array) -> tuple[Carry, jax.Array]:
        """The plain cell: (carry, x_t) -> (carry', h_t), nothing precomputed."""
        gx = self.project(x_BD) + self.bias.reshape(-1)
        w_hh, b_rec = self.kind.flat_recurrent(self.w_hh, self.b_hn)
        new = self.kind.update(gx, recurrent_product(carry[0], w_hh, b_rec), tuple(carry))
        return new, new[0]


class BahdanauLayer(nn.Module):
    """Decoder layer 0 with additive attention inside the recurrence (Bahdanau et al. 2015):
    its previous state h queries the encoder memory, e_s = v . tanh(W_q h + W_k m_s), and
    the context joins the token embedding as the cell's input. Only the embedding part of
    the input projection can be hoisted; the context part runs inside the scan."""
    cell: str  # rnn | lstm | gru
    in_features: int
    memory_features: int
    hidden: int
    dtype: Dtype = jnp.float32
    unroll: int = 1

    def setup(self):
        h = self.hidden
        self.kind = cell_kind(self.cell)
        width = self.in_features + self.memory_features
        self.w_ih, self.w_hh, self.bias, self.b_hn = self.kind.params(self, width, h)
        init = nn.initializers.xavier_uniform()
        self.w_q = self.param('w_q', partitioned(init, ('embed', 'mlp')), (h, h), jnp.float32)
        self.w_k = self.param('w_k', partitioned(init, ('embed', 'mlp')), (self.memory_features, h), jnp.float32)
        self.v = self.param('v', partitioned(nn.initializers.normal(h**-0.5), ('mlp',)), (h,), jnp.float32)

    def keys(self, memory_BSE: jax.Array) -> jax.Array:
        """W_k m_s for every source position, once per sequence: [B, S, A]."""
        return jnp.dot(memory_BSE, self.w_k)

    def _weights(self):
        d, g, h = self.w_ih.shape
        w = self.w_ih.reshape(d, g * h)
        return w[:self.in_features], w[self.in_features:], self.bias.reshape(g * h)

    def _step(self, carry: Carry, gx_BG: jax.Array, memory: dict) -> Carry:
        _, w_ctx, _ = self._weights()
        e_BS = jnp.tanh(memory['keys'] + jnp.dot(carry[0], self.w_q)[:, None]) @ self.v
        a_BS = jax.nn.softmax(jnp.where(memory['valid'], e_BS, MASKED_SCORE), axis=-1)
        ctx_BE = jnp.einsum('bs,bse->be', a_BS, memory['memory'])
        rec = recurrent_product(carry[0], *self.kind.flat_recurrent(self.w_hh, self.b_hn))
        return self.kind.update(gx_BG + jnp.dot(ctx_BE, w_ctx), rec, carry)

    def __call__(self, x_TBD: jax.Array, carry0: Carry, memory: dict) -> tuple[jax.Array, Carry]:
        w_emb, _, bias = self._weights()
        gx_TBG = matmul(x_TBD, w_emb, self.dtype) + bias

        def body(carry, gx_BG):
            new = self._step(carry, gx_BG, memory)
            return new, new[0]

        final, h_TBH = jax.lax.scan(body, tuple(carry0), gx_TBG, unroll=self.unroll)
        return h_TBH, final

    def step(self, carry: Carry, x_BD: jax.Array, memory: dict) -> tuple[Carry, jax.Array]:
        w_emb, _, bias = self._weights()
        gx = matmul(x_BD, w_emb, self.dtype) + bias
        new = self._step(tuple(carry), gx, memory)
        return new, new[0]
