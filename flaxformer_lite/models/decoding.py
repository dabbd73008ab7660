"""Autoregressive decoding over any model that offers `StepFns` (a KV cache or a carried
recurrent state): greedy, temperature / top-k sampling, and beam search.

Every function runs a fixed number of steps inside `lax.scan`, so it jits to one
program. Sequences that emit `eos_id` keep emitting `pad_id` afterwards.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flaxformer_lite.models.family import StepFns

_NEG = -1e9


def _finish(tokens_B, done_B, eos_id, pad_id):
    """After EOS, emit padding; returns (tokens, done)."""
    if eos_id is None:
        return tokens_B, done_B
    tokens_B = jnp.where(done_B, pad_id, tokens_B)
    return tokens_B, done_B | (tokens_B == eos_id)


def prefill(step_fns: StepFns, params, state, prompt_BT: jax.Array):
    """Feed a prompt token by token; returns (state, logits after the last prompt token)."""
    def body(state, tok_B):
        logits, state = step_fns.step(params, state, tok_B)
        return state, logits
    state, logits_TBV = jax.lax.scan(body, state, prompt_BT.T)
    return state, logits_TBV[-1]


def greedy(step_fns: StepFns, params, batch: Mapping[str, jax.Array], *, length: int, bos_id: int,
           eos_id: int | None = None, pad_id: int = 0) -> jax.Array:
    """The most likely token at every step: tokens [B, length]."""
    return sample(step_fns, params, batch, length=length, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                  temperature=0.0)


def sample(step_fns: StepFns, params, batch: Mapping[str, jax.Array], *, length: int, bos_id: int,
           rng: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
           eos_id: int | None = None, pad_id: int = 0, prompt_BT: jax.Array | None = None) -> jax.Array:
    """Sampling from softmax(logits / temperature), optionally among the top_k tokens only;
    temperature 0 is greedy. With `prompt_BT` (language models) generation continues the
    prompt; otherwise it starts from `bos_id` (sequence-to-sequence decoders)."""
    b = batch['inputs'].shape[0]
    state = step_fns.init(params, batch)
    if prompt_BT is not None:
        state, logits = prefill(step_fns, params, state, prompt_BT)
    else:
        logits, state = step_fns.step(params, state, jnp.full((b,), bos_id, jnp.int32))
    rng = jax.random.key(0) if rng is None else rng

    def choose(logits_BV, key):
        if temperature == 0.0:
            return logits_BV.argmax(-1).astype(jnp.int32)
        logits_BV = logits_BV.astype(jnp.float32) / temperature
        if top_k:
            kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV < kth, _NEG, logits_BV)
        return jax.random.categorical(key, logits_BV).astype(jnp.int32)

    def body(carry, key):
        state, logits, done = carry
        tok, done = _finish(choose(logits, key), done, eos_id, pad_id)
        logits, state = step_fns.step(params, state, tok)
        return (state, logits, done), tok

    keys = jax.random.split(rng, length)
    # The last step's logits are computed and dropped: one program for every length.
    _, tokens_TB = jax.lax.scan(body, (state, logits, jnp.zeros((b,), bool)), keys)
    return tokens_TB.T


def _gather_beams(tree: Any, index_BK: jax.Array, batch_axis_of) -> Any:
    """Reorder the beams of every state leaf: leaf[b * K + k] <- leaf[b * K + index[b, k]]."""
    b, k = index_BK.shape
    flat = (index_BK + jnp.arange(b)[:, None] * k).reshape(-1)

    def gather(path, leaf):
        axis = batch_axis_of(path, leaf, b * k)
        return leaf if axis is None else jnp.take(leaf, flat, axis=axis)
    return jax.tree_util.tree_map_with_path(gather, tree)


def default_batch_axis(path, leaf, n: int) -> int | None:
    del path
    return 0 if getattr(leaf, 'ndim', 0) > 0 and leaf.shape[0] == n else None


def beam_search(step_fns: StepFns, params, batch: Mapping[str, jax.Array], *, length: int, bos_id: int,
                beam_size: int = 4, alpha: float = 0.6, eos_id: int | None = None, pad_id: int = 0,
                batch_axis_of=None, prompt_BT: jax.Array | None = None) -> jax.Array:
    """Beam search with the GNMT length penalty ((5 + n) / 6) ** alpha over `length` steps.

    Each of the B * K hypotheses carries its own state; after every step the K best
    continuations of each sequence are kept and their states reordered. Returns the
    best hypothesis [B, length]; beam_size=1 is greedy decoding. With `prompt_BT`
    (language models) the beams continue the prompt; otherwise they start from `bos_id`.
    """
    b, k = batch['inputs'].shape[0], beam_size
    batch_axis_of = batch_axis_of or step_fns.batch_axis_of or default_batch_axis
    tiled = {key: jnp.repeat(v, k, axis=0) for key, v in batch.items()}
    state = step_fns.init(params, tiled)
    if prompt_BT is not None:
        state, logits = prefill(step_fns, params, state, jnp.repeat(prompt_BT, k, axis=0))
    else:
        logits, state = step_fns.step(params, state, jnp.full((b * k,), bos_id, jnp.int32))
    # Only the first beam is live at the start, so the K beams do not start as copies.
    score_BK = jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1))
    done_BK = jnp.zeros((b, k), bool)
    lengths_BK = jnp.zeros((b, k), jnp.int32)
    tokens_BKT = jnp.zeros((b, k, length), jnp.int32)

    def body(carry, t):
        state, logits, score, done, lengths, tokens = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, -1)
        v = logp.shape[-1]
        if eos_id is not None:  # a finished hypothesis can only continue with padding, for free
            frozen = jnp.full((v,), _NEG).at[pad_id].set(0.0)
            logp = jnp.where(done[..., None], frozen, logp)
        cand = (score[..., None] + logp).reshape(b, k * v)
        score, flat = jax.lax.top_k(cand, k)
        parent, tok = flat // v, (flat % v).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, t].set(tok)
        done = jnp.take_along_axis(done, parent, axis=1)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~done).astype(jnp.int32)
        if eos_id is not None:
            done = done | (tok == eos_id)
        state = _gather_beams(state, parent, batch_axis_of)
        logits, state = step_fns.step(params, state, tok.reshape(-1))
        return (state, logits, score, done, lengths, tokens), None

    carry = (state, logits, score_BK, done_BK, lengths_BK, tokens_BKT)
    (_, _, score, _, lengths, tokens), _ = jax.lax.scan(body, carry, jnp.arange(length))
    penalty = ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha
    best = (score / penalty).argmax(-1)
    return jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
