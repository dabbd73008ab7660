"""Recurrent baselines (RNN, LSTM, GRU) in the Transformer's three shapes.

  RecurrentLM          causal language model (the DecoderOnly counterpart): logits [B, T, V]
  RecurrentClassifier  encoder (optionally bidirectional) + pooling + head: [B, C] or [B]
  RecurrentSeq2Seq     encoder-decoder, with no attention (the encoder's final states start
                       the decoder), Bahdanau (additive, inside the recurrence) or Luong
                       (multiplicative "general", on top of the decoder) attention

They take the same batches as the Transformer and return the same shapes, so a config
changes `model.name` and nothing else. The embedding width is the recurrent width
`hidden`, so a shared embedding doubles as the output projection, as in the Transformer.
Stacks are time-major inside (x_TBD): each layer is one hoisted product plus one scan
(`recurrent_cells.py`, the loop in `recurrence.py`); when the embedding table has fewer
rows than the batch has tokens, the first layer projects the table instead of every
token (`embed_inputs`).
Decoding carries the recurrent state: `initial_state`/`encode` start it, `step` feeds
one token (see `recurrent_family.decoder`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models import mup
from flaxformer_lite.models.embeddings import Embed
from flaxformer_lite.models.layers import Dense, constrain, dtype_of
from flaxformer_lite.models.recurrent_cells import (MASKED_SCORE, BahdanauLayer, Cell, RecurrentLayer, cell_kind,
                                                    matmul)
from flaxformer_lite.models.transformer import pool, readout_input, shift_right


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """Hyperparameters of every recurrent shape (filled by `recurrent_family.resolve`)."""
    cell: str  # rnn | lstm | gru
    vocab_size: int
    num_outputs: int  # output vocabulary, classes, or 1 (regression)
    num_layers: int  # decoder layers (encoder layers for the classifier)
    encoder_layers: int  # encoder-decoder only
    hidden: int  # recurrent width = embedding width
    dropout: float = 0.0  # on the embeddings and between layers (never on the recurrence)
    bidirectional: bool = False  # encoders only
    residual: bool = False  # x + layer(x) between stacked layers of equal width
    rnn_attention: str = 'none'  # seq2seq: none | bahdanau | luong
    unroll: int = 1
    pooling: str = 'mean'
    share_embeddings: bool = True
    scale_embeddings: bool = True
    dtype: str = 'float32'
    pad_id: int = 0
    bos_id: int = 1
    fused: bool = True  # custom-VJP recurrence (False: plain scan + autodiff, the reference)
    mup_base_width: int | None = None  # muP's base hidden (optim.base_width); None: standard (models/mup.py)

    @property
    def kind(self) -> Cell:
        """The cell object of `cell` (gates, carry size, step)."""
        return cell_kind(self.cell)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def readout_multiplier(self) -> float:
        return mup.readout_multiplier(self.hidden, self.mup_base_width)

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> 'RecurrentConfig':
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


class RecurrentStack(nn.Module):
    """`num_layers` recurrent layers, one or two directions each (outputs concatenated),
    dropout after every layer, residual connections where widths agree. `offset` is the
    index of the first layer in the whole stack (residuals start at index 1)."""
    cfg: RecurrentConfig
    num_layers: int
    in_features: int
    bidirectional: bool = False
    offset: int = 0

    def setup(self):
        c = self.cfg
        dirs = 2 if self.bidirectional else 1
        kw = dict(cell=c.cell, hidden=c.hidden, dtype=dtype_of(c.dtype), unroll=c.unroll, fused=c.fused)
        widths = [self.in_features] + [dirs * c.hidden] * (self.num_layers - 1)
        self.fwd = [RecurrentLayer(in_features=w, **kw) for w in widths]
        if self.bidirectional:
            self.bwd = [RecurrentLayer(in_features=w, **kw) for w in widths]
        self.drop = nn.Dropout(c.dropout)

    def _residual(self, index: int, width_in: int) -> bool:
        dirs = 2 if self.bidirectional else 1
        return self.cfg.residual and index + self.offset >= 1 and width_in == dirs * self.cfg.hidden

    def __call__(self, x_TBD: jax.Array | None, mask_TB: jax.Array | None = None, *, carries: list | None = None,
                 deterministic: bool = True, tokens: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, list]:
        """-> (y_TBH', final carries per layer: a Carry, or (forward, backward) carries).
        `tokens` = (tokens_TB, table_VD) stands for x_TBD = table[tokens] (see `embed_inputs`)."""
        finals = []
        for i in range(self.num_layers):
            gx_fwd = gx_bwd = None
            if i == 0 and tokens is not None:
                gx_fwd = self.fwd[0].project_table(tokens[1], tokens[0])
                gx_bwd = self.bwd[0].project_table(tokens[1], tokens[0]) if self.bidirectional else None
            y, final = self.fwd[i](x_TBD, None if carries is None else carries[i], mask_TB, gx_TBG=gx_fwd)
            if self.bidirectional:
                y_back, final_back = self.bwd[i](x_TBD, None, mask_TB, reverse=True, gx_TBG=gx_bwd)
                y, final = jnp.concatenate([y, y_back], axis=-1), (final, final_back)
            if x_TBD is not None and self._residual(i, x_TBD.shape[-1]):
                y = y + x_TBD.astype(y.dtype)
            # No sharding constraint on y: pinning these time-major states to ('act_length',
            # 'act_batch', 'act_mlp') on a data x fsdp x tensor mesh (weights over 'fsdp')
            # makes XLA's SPMD partitioner (jaxlib 0.10.2) return 10-70% wrong gradients, for
            # the custom-VJP and the plain-scan recurrence alike: it mis-partitions a dot in the
            # scan's backward step (experiments/xla_scan_sharding_repro.py, pure jax). The
            # layout is covered by tests/test_sharding.py (every cell, both recurrences).
            x_TBD = self.drop(y, deterministic=deterministic)
            finals.append(final)
        return x_TBD, finals

    def step(self, x_BD: jax.Array, carries: list) -> tuple[jax.Array, list]:
        """One token through every layer (one direction only): -> (y_BH, carries)."""
        assert not self.bidirectional, 'a bidirectional stack cannot run token by token'
        new = []
        for i in range(self.num_layers):
            carry, y = self.fwd[i].step(carries[i], x_BD)
            if self._residual(i, x_BD.shape[-1]):
                y = y + x_BD.astype(y.dtype)
            x_BD = y
            new.append(carry)
        return x_BD, new

    def zero_carries(self, batch: int) -> list:
        return [self.cfg.kind.zero_carry(batch, self.cfg.hidden) for _ in range(self.num_layers)]


def _embed(c: RecurrentConfig, vocab: int) -> Embed:
    return Embed(vocab, c.hidden, scale=c.scale_embeddings, dtype=dtype_of(c.dtype),
                 scale_width=mup.embed_width(c.hidden, c.mup_base_width))


def embed_inputs(c: RecurrentConfig, embed: Embed, drop: nn.Dropout, tokens_BT: jax.Array,
                 deterministic: bool) -> dict:
    """The first layer's input, as stack keyword arguments: the embedded tokens
    (time-major, dropout applied), or, when the table has no more rows than the batch has
    tokens and no dropout applies, the table and the tokens, so that the first layer
    projects the table instead of every token (`RecurrentLayer.project_table`): the
    same numbers from a smaller product."""
    tokens_TB = tokens_BT.T
    vocab = embed.embedding.shape[0]
    if (deterministic or c.dropout == 0.0) and vocab <= tokens_TB.size:
        dt = dtype_of(c.dtype)
        table = embed.embedding.astype(dt)
        if c.scale_embeddings:
            table = table * jnp.sqrt(embed.width).astype(dt)
        return dict(x_TBD=None, tokens=(tokens_TB, table))
    return dict(x_TBD=drop(embed(tokens_TB), deterministic=deterministic))


def _head(c: RecurrentConfig) -> Dense:
    return Dense(c.num_outputs, ('embed', 'vocab'), dtype=dtype_of(c.dtype))


def _vocab_logits(c: RecurrentConfig, y_BTH: jax.Array, embed: Embed, head: Dense | None) -> jax.Array:
    """Output projection (the shared embedding's transpose or a Dense), float32 logits,
    computed on the flattened [B*T, H] array (see `recurrent_cells.matmul`), its input
    times muP's readout multiplier (where it is not 1)."""
    y_BTH = readout_input(c, y_BTH)
    b, t, h = y_BTH.shape
    if head is None:
        logits = matmul(y_BTH, embed.embedding.T, dtype_of(c.dtype))
    else:
        logits = head(y_BTH.reshape(b * t, h)).reshape(b, t, -1)
    return constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))


class RecurrentLM(nn.Module):
    """Causal language model: logits [B, T, V] for next-token prediction on `inputs`.

    Causal decoders read every token (no pad masking): padding only ever follows the
    real tokens, whose predictions it cannot change.
    """
    cfg: RecurrentConfig

    def setup(self):
        c = self.cfg
        self.embed = _embed(c, c.vocab_size)
        self.stack = RecurrentStack(c, c.num_layers, c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.head = None if c.share_embeddings else _head(c)

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        inputs = embed_inputs(self.cfg, self.embed, self.drop, batch['inputs'], not train)
        y_TBH, _ = self.stack(**inputs, deterministic=not train)
        return _vocab_logits(self.cfg, y_TBH.transpose(1, 0, 2), self.embed, self.head)

    def initial_state(self, batch: Mapping[str, jax.Array]) -> dict:
        return {'carries': self.stack.zero_carries(batch['inputs'].shape[0])}

    def step(self, state: dict, tokens_B: jax.Array) -> tuple[jax.Array, dict]:
        y_BH, carries = self.stack.step(self.embed(tokens_B), state['carries'])
        return _vocab_logits(self.cfg, y_BH[:, None], self.embed, self.head)[:, 0], {'carries': carries}


class RecurrentClassifier(nn.Module):
    """Encoder + pooling + head: logits [B, C] (classify) or predictions [B] (regress).

    Pads (`pad_id`) carry the state through unchanged, in both directions, so a padded
    sequence pools exactly like the unpadded one under every `pooling`.
    """
    cfg: RecurrentConfig
    regression: bool = False

    def setup(self):
        c = self.cfg
        self.embed = _embed(c, c.vocab_size)
        self.encoder = RecurrentStack(c, c.num_layers, c.hidden, bidirectional=c.bidirectional)
        self.drop = nn.Dropout(c.dropout)
        self.head = Dense(c.num_outputs, ('embed', None), dtype=jnp.float32)

    def _stack(self) -> RecurrentStack:
        return self.encoder

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        c = self.cfg
        tokens_BT = batch['inputs']
        valid_BT = tokens_BT != c.pad_id
        inputs = embed_inputs(c, self.embed, self.drop, tokens_BT, not train)
        y_TBH, _ = self._stack()(**inputs, mask_TB=valid_BT.T, deterministic=not train)
        pooled = pool(y_TBH.transpose(1, 0, 2), valid_BT, c.pooling)
        out = self.head(readout_input(c, pooled.astype(jnp.float32)))
        return out[:, 0] if self.regression else out


class RecurrentDecoderClassifier(RecurrentClassifier):
    """The decoder_classifier shape: a one-directional stack under 'stack', where
    RecurrentLM has it, so a pretrained language model's layers load into it as they are."""

    def setup(self):
        c = self.cfg
        self.embed = _embed(c, c.vocab_size)
        self.stack = RecurrentStack(c, c.num_layers, c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.head = Dense(c.num_outputs, ('embed', None), dtype=jnp.float32)

    def _stack(self) -> RecurrentStack:
        return self.stack


class RecurrentSeq2Seq(nn.Module):
    """Encoder over `inputs`, decoder over shifted `targets`: logits [B, T, V].

    The decoder starts from the encoder's final states (layer by layer; a bidirectional
    encoder's two directions are joined by a learned bridge per layer and carry part:
    tanh(W [fwd; bwd] + b) for h, linear for the LSTM's c). Attention: 'bahdanau' feeds
    the context into decoder layer 0 at every step; 'luong' attends with the top
    decoder state and outputs tanh(W_c [context; h]) (no input feeding).
    `encode` + `step` decode token by token with the same numbers as the full pass.
    """
    cfg: RecurrentConfig

    def setup(self):
        c = self.cfg
        h, dirs = c.hidden, c.directions
        self.embed = _embed(c, c.vocab_size)
        if not c.share_embeddings:
            self.target_embed = _embed(c, c.num_outputs)
        self.encoder = RecurrentStack(c, c.encoder_layers, h, bidirectional=c.bidirectional)
        if c.bidirectional:
            self.bridge = [Dense(h, ('embed', 'mlp'), dtype=jnp.float32)
                           for _ in range(c.num_layers * c.kind.carry_size)]
        first = 0
        if c.rnn_attention == 'bahdanau':
            self.attention = BahdanauLayer(c.cell, h, dirs * h, h, dtype=dtype_of(c.dtype), unroll=c.unroll)
            first = 1
        self.decoder = RecurrentStack(c, c.num_layers - first, h, offset=first) if c.num_layers > first else None
        if c.rnn_attention == 'luong':
            self.score = Dense(dirs * h, ('embed', 'mlp'), use_bias=False, dtype=dtype_of(c.dtype))
            self.combine = Dense(h, ('embed', 'mlp'), use_bias=False, dtype=dtype_of(c.dtype))
        self.drop = nn.Dropout(c.dropout)
        self.head = None if c.share_embeddings else _head(c)

    def _target_embed(self) -> Embed:
        return self.embed if self.cfg.share_embeddings else self.target_embed

    def _initial_carries(self, finals: list) -> list:
        c = self.cfg
        carries = []
        for i in range(c.num_layers):
            final = finals[min(i, len(finals) - 1)]
            if c.bidirectional:
                fwd, bwd = final
                parts = []
                for k in range(c.kind.carry_size):
                    joined = self.bridge[i * c.kind.carry_size + k](jnp.concatenate([fwd[k], bwd[k]], -1))
                    parts.append(jnp.tanh(joined) if k == 0 else joined)
                final = tuple(parts)
            carries.append(tuple(final))
        return carries

    def encode(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> dict:
        """The decoding state: initial carries and the encoder memory [B, S, E] (batch-first)."""
        c = self.cfg
        tokens_BS = batch['inputs']
        valid_BS = tokens_BS != c.pad_id
        inputs = embed_inputs(c, self.embed, self.drop, tokens_BS, not train)
        y_SBE, finals = self.encoder(**inputs, mask_TB=valid_BS.T, deterministic=not train)
        state = {'carries': self._initial_carries(finals)}
        if c.rnn_attention != 'none':
            memory_BSE = y_SBE.transpose(1, 0, 2)
            state.update(memory=memory_BSE, valid=valid_BS)
            if c.rnn_attention == 'bahdanau':
                state['keys'] = self.attention.keys(memory_BSE)
        return state

    def _luong(self, h_BTH: jax.Array, state: dict) -> jax.Array:
        q_BTE = self.score(h_BTH)
        s_BTS = jnp.einsum('bte,bse->bts', q_BTE, state['memory'].astype(q_BTE.dtype)).astype(jnp.float32)
        a_BTS = jax.nn.softmax(jnp.where(state['valid'][:, None], s_BTS, MASKED_SCORE), axis=-1)
        ctx_BTE = jnp.einsum('bts,bse->bte', a_BTS, state['memory'].astype(jnp.float32))
        return jnp.tanh(self.combine(jnp.concatenate([ctx_BTE.astype(h_BTH.dtype), h_BTH], -1)))

    def _memory(self, state: dict) -> dict:
        return {k: state[k] for k in ('memory', 'valid', 'keys')}

    def decode(self, state: dict, tokens_BT: jax.Array, *, train: bool = False) -> jax.Array:
        """Teacher-forced logits for decoder input tokens [B, T]."""
        c = self.cfg
        carries = state['carries']
        if c.rnn_attention == 'bahdanau':
            x_TBD = self.drop(self._target_embed()(tokens_BT.T), deterministic=not train)
            x_TBD, _ = self.attention(x_TBD, carries[0], self._memory(state))
            inputs = dict(x_TBD=self.drop(x_TBD, deterministic=not train))
            carries = carries[1:]
        else:
            inputs = embed_inputs(c, self._target_embed(), self.drop, tokens_BT, not train)
        if self.decoder is not None:
            x_TBD, _ = self.decoder(**inputs, carries=carries, deterministic=not train)
        else:
            x_TBD = inputs['x_TBD']
        h_BTH = x_TBD.transpose(1, 0, 2)
        if c.rnn_attention == 'luong':
            h_BTH = self._luong(h_BTH, state)
        return _vocab_logits(c, h_BTH, self._target_embed(), self.head)

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        state = self.encode(batch, train=train)
        return self.decode(state, shift_right(batch['targets'], self.cfg.bos_id), train=train)

    def step(self, state: dict, tokens_B: jax.Array) -> tuple[jax.Array, dict]:
        c = self.cfg
        carries = list(state['carries'])
        x_BD = self._target_embed()(tokens_B)
        new = []
        if c.rnn_attention == 'bahdanau':
            carry, x_BD = self.attention.step(carries[0], x_BD, self._memory(state))
            new.append(carry)
            carries = carries[1:]
        if self.decoder is not None:
            x_BD, rest = self.decoder.step(x_BD, carries)
            new += rest
        h_B1H = x_BD[:, None]
        if c.rnn_attention == 'luong':
            h_B1H = self._luong(h_B1H, state)
        logits = _vocab_logits(c, h_B1H, self._target_embed(), self.head)[:, 0]
        return logits, {**state, 'carries': new}
