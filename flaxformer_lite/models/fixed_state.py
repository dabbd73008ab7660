"""The stack that the fixed-state families (recurrent and attention-free) share.

  FixedStateLM          causal language model: logits [B, T, V] (the DecoderOnly counterpart)
  FixedStateClassifier  the same causal stack + pooling + head: [B, C] or [B]

Each layer is pre-norm residual: x + mixer(norm(x)), then, where the family has one
(`mlp_expand` > 0), x + mlp(norm(x)); a final norm; embeddings tied with the output
projection (or a separate head), exactly as the Transformer's. Only the sequence
mixer differs between families (`linear_attention.py`, `mamba.py`, `mingru.py`): a
module built from `FixedStateConfig` with

  __call__(x_BTD) -> y_BTD                 the parallel form (training, evaluation)
  step(state, x_BD) -> (y_BD, state)       the recurrent form (decoding), one token
  zero_state(batch) -> state               arrays with a leading batch axis

Every stack here is causal, so a classifier's outputs at real tokens never see the
padding that follows them (every task pads at the end); pooling skips the pads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models import mup
from flaxformer_lite.models.embeddings import Embed
from flaxformer_lite.models.layers import Dense, FeedForward, Norm, constrain, dtype_of
from flaxformer_lite.models.transformer import pool, readout_input


@dataclasses.dataclass(frozen=True)
class FixedStateConfig:
    """Hyperparameters of every fixed-state family (filled by `fixed_state_family.resolve`)."""
    vocab_size: int
    num_outputs: int  # output vocabulary, classes, or 1 (regression)
    num_layers: int
    hidden: int  # model width: embeddings and the residual stream
    num_heads: int = 1  # linear_attention
    mlp_expand: int = 4  # channel-mixer width / hidden; 0: no channel mixer
    ffn: str = 'relu'  # the Transformer's default: the same channel mixer in every family
    norm: str = 'layernorm'
    dropout: float = 0.0  # embeddings and every residual branch
    pooling: str = 'mean'
    share_embeddings: bool = True
    scale_embeddings: bool = True
    dtype: str = 'float32'
    pad_id: int = 0
    bos_id: int = 1
    la_feature_map: str = 'elu'
    la_decay: str = 'none'
    chunk_size: int = 16
    ssm_state: int = 16
    ssm_conv: int = 4
    ssm_expand: int = 2
    mingru_expand: int = 1
    mup_base_width: int | None = None  # muP's base hidden (optim.base_width); None: standard (models/mup.py)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def readout_multiplier(self) -> float:
        return mup.readout_multiplier(self.hidden, self.mup_base_width)

    @property
    def mlp_width(self) -> int:
        return self.mlp_expand * self.hidden

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> 'FixedStateConfig':
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


class Layer(nn.Module):
    """norm -> mixer -> residual (+ norm -> MLP -> residual); dropout on each branch."""
    cfg: FixedStateConfig
    mixer_cls: Any  # the family's mixer module class

    def setup(self):
        c = self.cfg
        dt = dtype_of(c.dtype)
        self.norm = Norm(c.norm, dtype=dt)
        self.mixer = self.mixer_cls(c)
        if c.mlp_expand:
            self.mlp_norm = Norm(c.norm, dtype=dt)
            self.mlp = FeedForward(c.hidden, c.mlp_width, c.ffn, dtype=dt)
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        x_BTD = x_BTD + self.drop(self.mixer(self.norm(x_BTD)), deterministic=deterministic)
        if self.cfg.mlp_expand:
            x_BTD = x_BTD + self.drop(self.mlp(self.mlp_norm(x_BTD)), deterministic=deterministic)
        return constrain(x_BTD, ('act_batch', 'act_length', 'act_embed'))

    def step(self, state: Any, x_BD: jax.Array) -> tuple[jax.Array, Any]:
        y_BD, state = self.mixer.step(state, self.norm(x_BD))
        x_BD = x_BD + y_BD.astype(x_BD.dtype)
        if self.cfg.mlp_expand:
            x_BD = x_BD + self.mlp(self.mlp_norm(x_BD)[:, None])[:, 0]
        return x_BD, state

    def zero_state(self, batch: int) -> Any:
        return self.mixer.zero_state(batch)


class _Stack(nn.Module):
    """Embedding, layers and final norm; the heads live in the two shapes below."""
    cfg: FixedStateConfig
    mixer_cls: Any

    def setup(self):
        c = self.cfg
        self.embed = Embed(c.vocab_size, c.hidden, scale=c.scale_embeddings, dtype=dtype_of(c.dtype),
                           scale_width=mup.embed_width(c.hidden, c.mup_base_width))
        self.layers = [Layer(c, self.mixer_cls) for _ in range(c.num_layers)]
        self.final_norm = Norm(c.norm, dtype=dtype_of(c.dtype))
        self.drop = nn.Dropout(c.dropout)

    def features(self, tokens_BT: jax.Array, train: bool) -> jax.Array:
        x_BTD = self.drop(self.embed(tokens_BT), deterministic=not train)
        x_BTD = constrain(x_BTD, ('act_batch', 'act_length', 'act_embed'))
        for layer in self.layers:
            x_BTD = layer(x_BTD, deterministic=not train)
        return self.final_norm(x_BTD)


class FixedStateLM(_Stack):
    """Causal language model: logits [B, T, V]; `initial_state` + `step` decode with
    the families' fixed-size states and give the numbers of the full pass."""

    def setup(self):
        super().setup()
        c = self.cfg
        self.head = None if c.share_embeddings else Dense(c.num_outputs, ('embed', 'vocab'), dtype=dtype_of(c.dtype))

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = readout_input(self.cfg, x_BTD)
        logits = self.embed.attend(x_BTD) if self.head is None else self.head(x_BTD)
        return constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        return self._logits(self.features(batch['inputs'], train))

    def initial_state(self, batch: Mapping[str, jax.Array]) -> dict:
        b = batch['inputs'].shape[0]
        return {'layers': [layer.zero_state(b) for layer in self.layers]}

    def step(self, state: dict, tokens_B: jax.Array) -> tuple[jax.Array, dict]:
        x_BD = self.embed(tokens_B)
        new = []
        for layer, s in zip(self.layers, state['layers']):
            x_BD, s = layer.step(s, x_BD)
            new.append(s)
        return self._logits(self.final_norm(x_BD)[:, None])[:, 0], {'layers': new}


class FixedStateClassifier(_Stack):
    """The causal stack + pooling (over real tokens) + head: [B, C] or predictions [B]."""
    regression: bool = False

    def setup(self):
        super().setup()
        self.head = Dense(self.cfg.num_outputs, ('embed', None), dtype=jnp.float32)

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        tokens_BT = batch['inputs']
        pooled = pool(self.features(tokens_BT, train), tokens_BT != self.cfg.pad_id, self.cfg.pooling)
        out = self.head(readout_input(self.cfg, pooled.astype(jnp.float32)))
        return out[:, 0] if self.regression else out
