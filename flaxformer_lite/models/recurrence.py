"""A recurrent cell run over a whole sequence, with a hand-written gradient.

Speed comes from the layout cuDNN uses:
  * the input projections of all time steps are one matrix product before the time
    loop (`x_TBD @ W_ih`, "hoisted", done by the caller); the loop (`jax.lax.scan`, with
    `unroll`) only does `h @ W_hh` and the gate arithmetic;
  * the backward pass (`fused_recurrence`, a custom VJP) carries only the state
    gradients through time and leaves the recurrent weight gradient to one matrix
    product after the loop, instead of T rank-B updates of an [H, G*H] accumulator.
`scan_recurrence` is the same loop with gradients by plain autodiff (the reference).

Arrays are time-major: gx_TBG holds x W_ih of every step, G = gates * hidden, gate-major
(the weights are stored [in, gates, hidden]: see `recurrent_cells`). What differs between
cell kinds (the step, its VJP, what it saves) comes from a `StepCell` object.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

Carry = tuple  # of [B, H] float32 arrays; carry[0] is always the output h


class StepCell(Protocol):
    """What the recurrence needs of a cell kind (`recurrent_cells` has the three)."""

    @property
    def saves_in_place(self) -> bool:
        """Its saved activations are [B, G] and its d_gx is d_rec: the forward pass saves
        into the gx buffer and the backward pass writes d_rec over the saved values."""

    @property
    def backward_reads_new(self) -> bool:
        """Its `backward` reads the carry leaving the step (else it gets None)."""

    def forward(self, gx_BG: jax.Array, rec_BG: jax.Array, carry: Carry) -> tuple[Carry, jax.Array | None]:
        """One step: -> (new carry, the activations `backward` needs)."""

    def backward(self, saved: jax.Array | None, prev: Carry, new: Carry | None,
                 d_new: Carry) -> tuple[jax.Array | None, jax.Array, Carry]:
        """The step's VJP: -> (d_gx, or None where it equals d_rec; d_rec; d_prev)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentWeights:
    """The recurrence's parameters in loop layout: the input bias (added inside the loop,
    which saves a pass over gx), W_hh as one [H, G] matrix, and the bias inside the
    recurrent product (the GRU candidate's b_hn; None for other cells)."""
    bias_G: jax.Array
    w_hh_HG: jax.Array
    b_rec_G: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Loop:
    """The static part of a recurrence: the cell kind and the scan's unroll."""
    cell: StepCell
    unroll: int


def recurrent_product(h_BH: jax.Array, w_hh_HG: jax.Array, b_rec_G: jax.Array | None) -> jax.Array:
    """h W_hh (+ the GRU candidate's recurrent bias): the `rec` of a cell's `forward`."""
    rec = jnp.dot(h_BH, w_hh_HG, preferred_element_type=jnp.float32)
    return rec if b_rec_G is None else rec + b_rec_G


def _masked(new: Carry, old: Carry, m_B: jax.Array | None) -> Carry:
    """Padding steps carry the state through unchanged, so a padded sequence ends in
    the state of its real length (and a reversed one starts at its last real token)."""
    if m_B is None:
        return new
    return tuple(jnp.where(m_B[:, None], n, o) for n, o in zip(new, old))


def _materialized(fn: Callable, t: jax.Array):
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


def _step(cell: StepCell, w: RecurrentWeights, carry: Carry, gx_BG: jax.Array,
          m_B: jax.Array | None) -> tuple[Carry, jax.Array | None]:
    """One masked step from the carry: -> (new carry, saved activations)."""
    rec_BG = recurrent_product(carry[0], w.w_hh_HG, w.b_rec_G)
    new, saved = cell.forward(gx_BG + w.bias_G, rec_BG, carry)
    return _masked(new, carry, m_B), saved


def _outputs_pass(loop: _Loop, gx_TBG: jax.Array, w: RecurrentWeights, carry0: Carry,
                  mask_TB: jax.Array | None) -> tuple[Carry, jax.Array]:
    """The forward loop keeping only the outputs: -> (final carry, h_TBH)."""
    def body(carry, t):
        gx_BG, m_B = _materialized(lambda: jax.tree.map(lambda a: _at(a, t), (gx_TBG, mask_TB)), t)
        new, _ = _step(loop.cell, w, carry, gx_BG, m_B)
        return new, new[0]

    return jax.lax.scan(body, carry0, jnp.arange(gx_TBG.shape[0]), unroll=loop.unroll)


def _saving_pass(loop: _Loop, gx_TBG: jax.Array, w: RecurrentWeights, carry0: Carry,
                 mask_TB: jax.Array | None) -> tuple[Carry, Carry, jax.Array | None]:
    """The forward loop keeping what the backward pass reads: -> (final carry, every
    step's carry (each [T, B, H]), every step's saved activations). A cell that
    `saves_in_place` (the LSTM: it saves exactly as much per step as it reads, 4H)
    overwrites gx with its activations (a loop-carried buffer), which spares a
    zero-filled [T, B, 4H] array."""
    in_place = loop.cell.saves_in_place

    def body(state, t):
        carry, buf = state
        step_xs = (buf if in_place else gx_TBG, mask_TB)
        gx_BG, m_B = _materialized(lambda: jax.tree.map(lambda a: _at(a, t), step_xs), t)
        new, saved = _step(loop.cell, w, carry, gx_BG, m_B)
        if in_place:
            return (new, jax.lax.dynamic_update_index_in_dim(buf, saved, t, 0)), new
        return (new, buf), (new, saved)

    (final, buf), ys = jax.lax.scan(body, (carry0, gx_TBG if in_place else None), jnp.arange(gx_TBG.shape[0]),
                                    unroll=loop.unroll)
    if in_place:
        return final, ys, buf
    carries_T, saved_TBS = ys
    return final, carries_T, saved_TBS


def scan_recurrence(cell: StepCell, gx_TBG: jax.Array, w: RecurrentWeights, carry0: Carry,
                    mask_TB: jax.Array | None = None, *, unroll: int = 1) -> tuple[jax.Array, Carry]:
    """The recurrence over precomputed input products gx = x W_ih: -> (h_TBH, final
    carry). Plain `lax.scan`; gradients by autodiff. `mask_TB` (True = real token)
    makes pads carry the state through."""
    final, h_TBH = _outputs_pass(_Loop(cell, unroll), gx_TBG, w, tuple(carry0), mask_TB)
    return h_TBH, final


def fused_recurrence(cell: StepCell, gx_TBG: jax.Array, w: RecurrentWeights, carry0: Carry,
                     mask_TB: jax.Array | None = None, *, unroll: int = 1) -> tuple[jax.Array, Carry]:
    """`scan_recurrence` with the backward pass of cuDNN (see the module docstring)."""
    return _fused(_Loop(cell, unroll), gx_TBG, w, tuple(carry0), mask_TB)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(loop: _Loop, gx_TBG: jax.Array, w: RecurrentWeights, carry0: Carry,
           mask_TB: jax.Array | None) -> tuple[jax.Array, Carry]:
    final, h_TBH = _outputs_pass(loop, gx_TBG, w, carry0, mask_TB)
    return h_TBH, final


def _fused_fwd(loop, gx_TBG, w, carry0, mask_TB):
    final, carries_T, saved_TBS = _saving_pass(loop, gx_TBG, w, carry0, mask_TB)
    return (carries_T[0], final), (w, carry0, mask_TB, carries_T, saved_TBS)


def _fused_bwd(loop, res, cts):
    w, carry0, mask_TB, carries_T, saved_TBS = res
    d_h_TBH, d_final = cts
    cell = loop.cell
    w_GH = w.w_hh_HG.T
    g = w.w_hh_HG.shape[1]
    in_place = cell.saves_in_place  # the gate gradients overwrite the saved activations

    def body(state, t):
        d_carry, d_bias_G, d_brec_G, buf = state
        # One conditional fetches the step's inputs, the state entering it (prev) and the
        # state leaving it (new).
        def take():
            xs = jax.tree.map(lambda a: _at(a, t), (buf if in_place else saved_TBS, d_h_TBH, mask_TB))
            prev = tuple(jnp.where(t > 0, _at(c, jnp.maximum(t - 1, 0)), c0) for c, c0 in zip(carries_T, carry0))
            new = tuple(_at(c, t) for c in carries_T) if cell.backward_reads_new else None
            return xs, prev, new

        (saved, d_h_BH, m_B), prev, new = _materialized(take, t)
        d_new = (d_carry[0] + d_h_BH,) + tuple(d_carry[1:])
        d_cell = d_new if m_B is None else tuple(jnp.where(m_B[:, None], d, 0.0) for d in d_new)
        d_gx_BG, d_rec_BG, d_prev = cell.backward(saved, prev, new, d_cell)
        if m_B is not None:  # a skipped step hands its gradient straight to the previous state
            d_prev = tuple(jnp.where(m_B[:, None], dp, d) for dp, d in zip(d_prev, d_new))
        d_prev = (d_prev[0] + jnp.dot(d_rec_BG, w_GH),) + tuple(d_prev[1:])
        d_in_BG = d_rec_BG if d_gx_BG is None else d_gx_BG
        # bias gradients summed in the loop, while the step's gradient is in cache
        state = (d_prev, d_bias_G + d_in_BG.sum(0), d_brec_G + d_rec_BG.sum(0), buf)
        if in_place:
            return state[:3] + (jax.lax.dynamic_update_index_in_dim(buf, d_rec_BG, t, 0),), None
        return state, (d_gx_BG, d_rec_BG)

    zeros = jnp.zeros((g,), jnp.float32)
    t = carries_T[0].shape[0]
    init = (tuple(d_final), zeros, zeros, saved_TBS if in_place else None)
    (d_carry0, d_bias_G, d_brec_G, buf), d_seq = jax.lax.scan(body, init, jnp.arange(t), reverse=True,
                                                              unroll=loop.unroll)
    d_gx_TBG, d_rec_TBG = (None, buf) if in_place else d_seq
    d_gx_TBG = d_rec_TBG if d_gx_TBG is None else d_gx_TBG
    # The weight gradient of all steps at once: [H, T*B] @ [T*B, G], h_prev = [h0, h_0..h_{T-2}].
    h_prev_TBH = jnp.concatenate([carry0[0][None], carries_T[0][:-1]], axis=0)
    d_w_HG = jnp.dot(h_prev_TBH.reshape(-1, h_prev_TBH.shape[-1]).T, d_rec_TBG.reshape(-1, g))
    d_w = RecurrentWeights(d_bias_G, d_w_HG, None if w.b_rec_G is None else d_brec_G)
    return d_gx_TBG, d_w, d_carry0, None


_fused.defvjp(_fused_fwd, _fused_bwd)
