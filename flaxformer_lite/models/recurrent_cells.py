"""Recurrent cells (Elman RNN, LSTM, GRU) and one recurrent layer over a whole sequence.

Speed comes from the layout cuDNN uses:
  * the input projections of all time steps are one matrix product before the time
    loop (`x_TBD @ W_ih`, "hoisted"); the loop (`jax.lax.scan`, with `unroll`) only does
    `h @ W_hh` and the gate arithmetic;
  * the backward pass (`fused_recurrence`, a custom VJP) carries only the state
    gradients through time and leaves the recurrent weight gradient to one matrix
    product after the loop, instead of T rank-B updates of an [H, G*H] accumulator.
`scan_recurrence` is the same loop with gradients by plain autodiff (the reference).

Weights are stored gate-major, [in, gates, hidden], so that sharding the hidden axis
('mlp') keeps every gate of a unit on one device; the gate axis is never sharded (None).
Arrays are time-major inside: x_TBD, gx_TBG (G = gates * hidden, gate-major).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models.layers import Dtype, partitioned

CELLS = ('rnn', 'gru', 'lstm')
NUM_GATES = {'rnn': 1, 'gru': 3, 'lstm': 4}  # lstm: i, f, g, o; gru: r, z, n
CARRY_SIZE = {'rnn': 1, 'gru': 1, 'lstm': 2}  # (h,) or (h, c)

Carry = tuple  # of [B, H] float32 arrays; carry[0] is always the output h


def cell_forward(cell: str, gx_BG: jax.Array, rec_BG: jax.Array, carry: Carry) -> tuple[Carry, jax.Array | None]:
    """One step from the input pre-activations gx = x W_ih + b and the recurrent ones
    rec = h W_hh (+ b_hn on the GRU candidate); both [B, gates * H], gate-major.
    -> (new carry, the activations the backward pass needs).

    rnn:  h' = tanh(gx + rec)                                       saves nothing (h' is kept)
    lstm: i, f, g, o = gx + rec;  c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c')
                                                                    saves s(i), s(f), tanh(g), s(o)
    gru:  r = s(gx_r + rec_r), z = s(gx_z + rec_z), n = tanh(gx_n + r * rec_n),
          h' = (1 - z) n + z h   (the cuDNN / PyTorch form: reset applied after W_hn,
          which lets all three recurrent products be one matrix product)
                                                                    saves r, z, n, rec_n
    """
    h = carry[0].shape[-1]

    def gate(z, k):
        return z[..., k * h:(k + 1) * h]

    if cell == 'rnn':
        return (jnp.tanh(gx_BG + rec_BG),), None
    if cell == 'lstm':
        # All four activations in one elementwise pass over [B, 4H]: s(x) = (1 + tanh(x / 2)) / 2,
        # so every column is a * tanh(a * x) + b with a = 1/2, b = 1/2 (i, f, o) or a = 1, b = 0 (g).
        a, b = _lstm_columns(h)
        act = a * jnp.tanh(a * (gx_BG + rec_BG)) + b
        i, f, g, o = (gate(act, k) for k in range(4))
        c = f * carry[1] + i * g
        return (o * jnp.tanh(c), c), act
    if cell == 'gru':
        r = jax.nn.sigmoid(gate(gx_BG, 0) + gate(rec_BG, 0))
        u = jax.nn.sigmoid(gate(gx_BG, 1) + gate(rec_BG, 1))
        n = jnp.tanh(gate(gx_BG, 2) + r * gate(rec_BG, 2))
        return ((1.0 - u) * n + u * carry[0],), jnp.concatenate([r, u, n, gate(rec_BG, 2)], axis=-1)
    raise ValueError(f'unknown cell {cell}')


def _lstm_columns(h: int) -> tuple[jax.Array, jax.Array]:
    """Per-column (a, b) of the LSTM's activations a * tanh(a * x) + b: sigmoid gates
    i, f, o (a = b = 1/2) and the tanh candidate g (a = 1, b = 0), gate-major [4H]."""
    a = jnp.repeat(jnp.array([0.5, 0.5, 1.0, 0.5], jnp.float32), h)
    return a, jnp.where(a == 0.5, 0.5, 0.0).astype(jnp.float32)


def cell_update(cell: str, gx_BG: jax.Array, rec_BG: jax.Array, carry: Carry) -> Carry:
    """`cell_forward` without the saved activations (the plain cell)."""
    return cell_forward(cell, gx_BG, rec_BG, carry)[0]


def cell_backward(cell: str, saved: jax.Array | None, prev: Carry, new: Carry, d_new: Carry):
    """The VJP of `cell_forward` from its saved activations and the carries entering
    (`prev`) and leaving (`new`) the step: -> (d_gx, d_rec, d_prev). Written out (the gate
    activations are not recomputed; autodiff of the gate slices would also sum four
    padded arrays) because it is the body of the backward time loop. For rnn and lstm
    d_gx is d_rec (both enter as gx + rec): it is returned once, as None."""
    dh = d_new[0]
    if cell == 'rnn':
        return None, dh * (1.0 - new[0] * new[0]), (jnp.zeros_like(dh),)
    h = dh.shape[-1]

    def gate(k):
        return saved[..., k * h:(k + 1) * h]

    if cell == 'lstm':
        i, f, g, o = (gate(k) for k in range(4))
        tc = jnp.tanh(new[1])
        dc = d_new[1] + dh * o * (1.0 - tc * tc)
        # d act / dz of a * tanh(a * z) + b is a^2 - (act - b)^2 (s(1 - s), or 1 - g^2): one
        # pass over [B, 4H], and a product the gate-split dot rewrite does not apply to.
        a, b = _lstm_columns(h)
        upstream = jnp.concatenate([dc * g, dc * prev[1], dc * i, dh * tc], axis=-1)
        dz = upstream * (a * a - jnp.square(saved - b))
        return None, dz, (jnp.zeros_like(dh), dc * f)
    if cell == 'gru':
        r, u, n, rec_n = (gate(k) for k in range(4))
        dzn = dh * (1.0 - u) * (1.0 - n * n)
        dzr = dzn * rec_n * r * (1.0 - r)
        dzu = dh * (prev[0] - n) * u * (1.0 - u)
        return (jnp.concatenate([dzr, dzu, dzn], axis=-1), jnp.concatenate([dzr, dzu, dzn * r], axis=-1),
                (dh * u,))
    raise ValueError(f'unknown cell {cell}')


def matmul(x_ND: jax.Array, w_DK: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """x @ w over the last axis of x, as one 2-D product (float32 result). Why 2-D: on
    XLA:CPU the weight gradient of a dot over a 3-D activation contracts two axes and
    runs ~3x slower than the same product on the flattened [N, D] array."""
    lead = x_ND.shape[:-1]
    y = jnp.dot(x_ND.reshape(-1, x_ND.shape[-1]).astype(dtype), w_DK.astype(dtype),
                preferred_element_type=jnp.float32)
    return y.reshape(*lead, w_DK.shape[-1])


def zero_carry(cell: str, batch: int, hidden: int) -> Carry:
    return tuple(jnp.zeros((batch, hidden), jnp.float32) for _ in range(CARRY_SIZE[cell]))


def _masked(new: Carry, old: Carry, m_B: jax.Array | None) -> Carry:
    """Padding steps carry the state through unchanged, so a padded sequence ends in
    the state of its real length (and a reversed one starts at its last real token)."""
    if m_B is None:
        return new
    return tuple(jnp.where(m_B[:, None], n, o) for n, o in zip(new, old))


def recurrent_product(h_BH, w_hh_HG, b_rec_G):
    """h W_hh (+ the GRU candidate's recurrent bias): the `rec` of `cell_forward`."""
    rec = jnp.dot(h_BH, w_hh_HG, preferred_element_type=jnp.float32)
    return rec if b_rec_G is None else rec + b_rec_G


def _materialized(fn, t: jax.Array):
    """fn(), computed inside a conditional on the loop index t that always takes it.

    Why: XLA:CPU fuses a dynamic slice (`x[t]`) into its consumer, and a loop fusion that
    both slices dynamically and evaluates tanh / exp compiles to scalar code, several
    times slower than the vectorised one. A conditional is a fusion barrier that XLA
    keeps (an optimization_barrier is dropped), so the gate arithmetic reads plain
    buffers. `fn` gathers everything a step reads, so each step pays for one.
    """
    return jax.lax.cond(t >= 0, fn, lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn)))


def _at(a: jax.Array, t: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a, t, 0, keepdims=False)


def _forward(cell, gx_TBG, bias_G, w_hh_HG, b_rec_G, carry0, mask_TB, unroll, keep_all):
    """-> (final carry, h_TBH) or, with keep_all, (final carry, (carries_T, saved_TBS)).
    The LSTM saves exactly as much per step as it reads (4H): its activations overwrite
    gx in place (a loop-carried buffer), which spares a zero-filled [T, B, 4H] array."""
    in_place = keep_all and cell == 'lstm'
    xs = (None if in_place else gx_TBG, mask_TB)

    def body(state, t):
        carry, buf = state
        step_xs = (buf if in_place else xs[0], xs[1])
        gx_BG, m_B = _materialized(lambda: jax.tree.map(lambda a: _at(a, t), step_xs), t)
        rec_BG = recurrent_product(carry[0], w_hh_HG, b_rec_G)
        new, saved = cell_forward(cell, gx_BG + bias_G, rec_BG, carry)
        new = _masked(new, carry, m_B)
        if in_place:
            return (new, jax.lax.dynamic_update_index_in_dim(buf, saved, t, 0)), new
        return (new, buf), ((new, saved) if keep_all else new[0])

    (final, buf), ys = jax.lax.scan(body, (carry0, gx_TBG if in_place else None), jnp.arange(gx_TBG.shape[0]),
                                    unroll=unroll)
    return final, ((ys, buf) if in_place else ys)


def scan_recurrence(cell: str, gx_TBG: jax.Array, bias_G: jax.Array, w_hh_HG: jax.Array,
                    b_rec_G: jax.Array | None, carry0: Carry, mask_TB: jax.Array | None = None,
                    unroll: int = 1) -> tuple[jax.Array, Carry]:
    """The recurrence over precomputed input products gx = x W_ih (the bias, added inside
    the loop, saves a pass over gx): -> (h_TBH, final carry). Plain `lax.scan`; gradients
    by autodiff. `mask_TB` (True = real token) makes pads carry the state through."""
    final, h_TBH = _forward(cell, gx_TBG, bias_G, w_hh_HG, b_rec_G, carry0, mask_TB, unroll, False)
    return h_TBH, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7))
def fused_recurrence(cell: str, gx_TBG: jax.Array, bias_G: jax.Array, w_hh_HG: jax.Array,
                     b_rec_G: jax.Array | None, carry0: Carry, mask_TB: jax.Array | None,
                     unroll: int) -> tuple[jax.Array, Carry]:
    """`scan_recurrence` with the backward pass of cuDNN (see the module docstring)."""
    return scan_recurrence(cell, gx_TBG, bias_G, w_hh_HG, b_rec_G, carry0, mask_TB, unroll)


def _fused_fwd(cell, gx_TBG, bias_G, w_hh_HG, b_rec_G, carry0, mask_TB, unroll):
    final, (carries_T, saved_TBS) = _forward(cell, gx_TBG, bias_G, w_hh_HG, b_rec_G, carry0, mask_TB, unroll,
                                             True)
    return (carries_T[0], final), (w_hh_HG, b_rec_G, carry0, mask_TB, carries_T, saved_TBS)


def _fused_bwd(cell, unroll, res, cts):
    w_hh_HG, b_rec_G, carry0, mask_TB, carries_T, saved_TBS = res
    d_h_TBH, d_final = cts
    w_GH = w_hh_HG.T
    g = w_hh_HG.shape[1]
    in_place = cell == 'lstm'  # the gate gradients overwrite the saved activations (both 4H)

    def body(state, t):
        d_carry, d_bias_G, d_brec_G, buf = state
        # One conditional fetches the step's inputs, the state entering it (prev) and the
        # state leaving it (new).
        def take():
            xs = jax.tree.map(lambda a: _at(a, t), (buf if in_place else saved_TBS, d_h_TBH, mask_TB))
            prev = tuple(jnp.where(t > 0, _at(c, jnp.maximum(t - 1, 0)), c0) for c, c0 in zip(carries_T, carry0))
            new = tuple(_at(c, t) for c in carries_T) if cell != 'gru' else None
            return xs, prev, new

        (saved, d_h_BH, m_B), prev, new = _materialized(take, t)
        d_new = (d_carry[0] + d_h_BH,) + tuple(d_carry[1:])
        d_cell = d_new if m_B is None else tuple(jnp.where(m_B[:, None], d, 0.0) for d in d_new)
        d_gx_BG, d_rec_BG, d_prev = cell_backward(cell, saved, prev, new, d_cell)
        if m_B is not None:  # a skipped step hands its gradient straight to the previous state
            d_prev = tuple(jnp.where(m_B[:, None], dp, d) for dp, d in zip(d_prev, d_new))
        d_prev = (d_prev[0] + jnp.dot(d_rec_BG, w_GH),) + tuple(d_prev[1:])
        d_gx_BG = d_rec_BG if d_gx_BG is None else d_gx_BG
        # bias gradients summed in the loop, while the step's gradient is in cache
        state = (d_prev, d_bias_G + d_gx_BG.sum(0), d_brec_G + d_rec_BG.sum(0), buf)
        if in_place:
            return state[:3] + (jax.lax.dynamic_update_index_in_dim(buf, d_rec_BG, t, 0),), None
        return state, (d_rec_BG if cell != 'gru' else (d_gx_BG, d_rec_BG))

    zeros = jnp.zeros((g,), jnp.float32)
    t = carries_T[0].shape[0]
    init = (tuple(d_final), zeros, zeros, saved_TBS if in_place else None)
    (d_carry0, d_bias_G, d_brec_G, buf), d_seq = jax.lax.scan(body, init, jnp.arange(t), reverse=True,
                                                              unroll=unroll)
    d_seq = buf if in_place else d_seq
    d_gx_TBG, d_rec_TBG = d_seq if cell == 'gru' else (d_seq, d_seq)
    # The weight gradient of all steps at once: [H, T*B] @ [T*B, G], h_prev = [h0, h_0..h_{T-2}].
    h_prev_TBH = jnp.concatenate([carry0[0][None], carries_T[0][:-1]], axis=0)
    d_w_HG = jnp.dot(h_prev_TBH.reshape(-1, h_prev_TBH.shape[-1]).T, d_rec_TBG.reshape(-1, g))
    return d_gx_TBG, d_bias_G, d_w_HG, (None if b_rec_G is None else d_brec_G), d_carry0, None


fused_recurrence.defvjp(_fused_fwd, _fused_bwd)


# --- parameters ---------------------------------------------------------------------------
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


def bias_init(cell: str):
    def init(key, shape, dtype=jnp.float32):
        del key
        b = jnp.zeros(shape, dtype)
        return b.at[1].set(1.0) if cell == 'lstm' else b  # forget gate open (Jozefowicz et al. 2015)
    return init


def cell_params(module: nn.Module, cell: str, in_features: int, hidden: int):
    """Create (w_ih [D, G, H], w_hh [H, G, H], bias [G, H], b_hn [H] | None) on `module`.

    Logical axes: the input dimension (model input or the previous state) is 'embed', the
    hidden/output dimension 'mlp' (tensor-parallel like a feed-forward layer), the gate
    axis None (never sharded: a unit's gates stay together)."""
    g = NUM_GATES[cell]
    f32 = jnp.float32
    w_ih = module.param('w_ih', partitioned(input_init, ('embed', None, 'mlp')), (in_features, g, hidden), f32)
    w_hh = module.param('w_hh', partitioned(recurrent_init, ('embed', None, 'mlp')), (hidden, g, hidden), f32)
    bias = module.param('bias', partitioned(bias_init(cell), (None, 'mlp')), (g, hidden), f32)
    b_hn = None
    if cell == 'gru':  # the candidate's recurrent bias sits inside r * (.), so it is its own parameter
        b_hn = module.param('b_hn', partitioned(nn.initializers.zeros_init(), ('mlp',)), (hidden,), f32)
    return w_ih, w_hh, bias, b_hn


def cell_param_count(cell: str, in_features: int, hidden: int) -> int:
    g = NUM_GATES[cell]
    return g * (in_features * hidden + hidden * hidden + hidden) + (hidden if cell == 'gru' else 0)


def flat_recurrent(cell: str, w_hh_HGH: jax.Array, b_hn_H: jax.Array | None):
    """The recurrent weight as one [H, G*H] matrix and its bias (GRU candidate only)."""
    h, g, _ = w_hh_HGH.shape
    b_rec = None
    if cell == 'gru':
        b_rec = jnp.concatenate([jnp.zeros((2 * h,), jnp.float32), b_hn_H])
    return w_hh_HGH.reshape(h, g * h), b_rec


class RecurrentLayer(nn.Module):
    """One direction of one recurrent layer over a time-major sequence.

    `__call__` is the fast form (hoisted input projection + scan); `step` is the plain
    cell, one token at a time, used for decoding (and as the reference in tests).
    """
    cell: str
    in_features: int
    hidden: int
    dtype: Dtype = jnp.float32
    unroll: int = 1
    fused: bool = True  # custom-VJP recurrence; False: plain scan + autodiff

    def setup(self):
        self.w_ih, self.w_hh, self.bias, self.b_hn = cell_params(self, self.cell, self.in_features, self.hidden)

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
                 reverse: bool = False, gx_TBG: jax.Array | None = None) -> tuple[jax.Array, Carry]:
        """-> (h_TBH, final carry). `reverse` reads the sequence backwards (outputs stay
        aligned with the inputs); with a mask, pads are skipped in either direction.
        `gx_TBG` replaces the input projection (x_TBD is then unused)."""
        gx_TBG = self.project(x_TBD) if gx_TBG is None else gx_TBG
        if carry0 is None:
            carry0 = zero_carry(self.cell, gx_TBG.shape[1], self.hidden)
        if reverse:
            gx_TBG = gx_TBG[::-1]
            mask_TB = None if mask_TB is None else mask_TB[::-1]
        w_hh, b_rec = flat_recurrent(self.cell, self.w_hh, self.b_hn)
        run = fused_recurrence if self.fused else scan_recurrence
        h_TBH, final = run(self.cell, gx_TBG, self.bias.reshape(-1), w_hh, b_rec, tuple(carry0), mask_TB,
                           self.unroll)
        return (h_TBH[::-1] if reverse else h_TBH), final

    def step(self, carry: Carry, x_BD: jax.Array) -> tuple[Carry, jax.Array]:
        """The plain cell: (carry, x_t) -> (carry', h_t), nothing precomputed."""
        gx = self.project(x_BD) + self.bias.reshape(-1)
        w_hh, b_rec = flat_recurrent(self.cell, self.w_hh, self.b_hn)
        new = cell_update(self.cell, gx, recurrent_product(carry[0], w_hh, b_rec), tuple(carry))
        return new, new[0]
