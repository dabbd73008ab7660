"""The Transformer of Vaswani et al. (2017) and its modern variants, in three shapes.

  EncoderDecoder     the paper's model, for sequence-to-sequence tasks
  DecoderOnly        causal language model (generative tasks, language modelling)
  EncoderClassifier  encoder + pooling + classifier (or regression) head; with
                     causal=True the decoder_classifier (a causal stack where
                     DecoderOnly has it: GPT-style fine-tuning of a language model)
  EncoderMLM         bidirectional encoder + vocabulary head: masked-language modelling
                     (BERT-style pretraining), its encoder where EncoderClassifier has it

All three share `Block` (self-attention, optional cross-attention, feed-forward, each
wrapped in residual + norm, post-norm as in the paper or pre-norm) and `Stack` (the
layers, unrolled or as one `nn.scan` with an optional remat policy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.models import mup
from flaxformer_lite.models.attention import MultiHeadAttention
from flaxformer_lite.models.embeddings import AddPositions, Embed
from flaxformer_lite.models.layers import Dense, FeedForward, Norm, constrain, dtype_of


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of every Transformer shape (filled by `transformer_family.resolve`)."""
    vocab_size: int
    num_outputs: int  # output vocabulary, classes, or 1 (regression)
    num_layers: int  # decoder layers (encoder layers for the classifier)
    encoder_layers: int  # encoder-decoder only
    d_model: int
    num_heads: int
    num_kv_heads: int
    d_ff: int
    max_len: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pos_encoding: str = 'sinusoidal'
    attention_impl: str = 'einsum'
    attention_block_size: int = 128
    ffn: str = 'relu'
    norm: str = 'layernorm'
    norm_position: str = 'pre'
    share_embeddings: bool = True
    scale_embeddings: bool = True
    scan_layers: bool = False
    remat: str = 'none'
    dtype: str = 'float32'
    pooling: str = 'mean'
    pad_id: int = 0
    bos_id: int = 1
    decode: bool = False  # build for cached autoregressive decoding
    mup_base_width: int | None = None  # muP's base d_model (optim.base_width); None: standard (models/mup.py)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def readout_multiplier(self) -> float:
        return mup.readout_multiplier(self.d_model, self.mup_base_width)

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> 'TransformerConfig':
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


class Block(nn.Module):
    """One layer: self-attention (+ cross-attention) + feed-forward, residual + norm."""
    cfg: TransformerConfig
    causal: bool
    cross: bool
    deterministic: bool

    def _sublayer(self, name: str, fn, x):
        """Residual wrapper: pre-norm x + f(norm(x)), or the paper's norm(x + f(x)).
        Dropout is applied to each sub-layer's output before the addition."""
        cfg = self.cfg
        norm = Norm(cfg.norm, dtype=dtype_of(cfg.dtype), name=f'{name}_norm')
        drop = nn.Dropout(cfg.dropout)
        if cfg.norm_position == 'pre':
            return x + drop(fn(norm(x)), deterministic=self.deterministic)
        return norm(x + drop(fn(x), deterministic=self.deterministic))

    @nn.compact
    def __call__(self, x_BTD, encoded_BSD=None, self_valid_BT=None, enc_valid_BS=None):
        cfg = self.cfg
        attn = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                    d_model=cfg.d_model, impl=cfg.attention_impl, block_size=cfg.attention_block_size,
                    dropout=cfg.attention_dropout, dtype=dtype_of(cfg.dtype),
                    query_multiplier=mup.query_multiplier(cfg.d_model, cfg.mup_base_width))
        self_attn = MultiHeadAttention(**attn, rotary=cfg.pos_encoding == 'rotary', decode=cfg.decode and self.causal,
                                       max_len=cfg.max_len, name='self_attention')
        x_BTD = self._sublayer('self_attention', lambda h: self_attn(
            h, causal=self.causal, kv_valid_BS=self_valid_BT, deterministic=self.deterministic), x_BTD)
        if self.cross:
            cross_attn = MultiHeadAttention(**attn, name='cross_attention')
            x_BTD = self._sublayer('cross_attention', lambda h: cross_attn(
                h, encoded_BSD, kv_valid_BS=enc_valid_BS, deterministic=self.deterministic), x_BTD)
        ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.ffn, dtype=dtype_of(cfg.dtype), name='mlp')
        x_BTD = self._sublayer('mlp', ffn, x_BTD)
        return constrain(x_BTD, ('act_batch', 'act_length', 'act_embed'))


class _ScanBlock(Block):
    """`Block` in the (carry, x) -> (carry, y) form that `nn.scan` wants."""

    def __call__(self, x_BTD, encoded_BSD, self_valid_BT, enc_valid_BS):
        return super().__call__(x_BTD, encoded_BSD, self_valid_BT, enc_valid_BS), None


_REMAT_POLICIES = {
    'full': None,  # save nothing inside a layer: recompute it all in the backward pass
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
    """`num_layers` Blocks, unrolled or scanned (parameters stacked on a 'layers' axis)."""
    cfg: TransformerConfig
    num_layers: int
    causal: bool
    cross: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x_BTD, encoded_BSD=None, self_valid_BT=None, enc_valid_BS=None):
        cfg = self.cfg
        block_cls = _ScanBlock if cfg.scan_layers else Block
        if cfg.remat != 'none':
            block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        kwargs = dict(cfg=cfg, causal=self.causal, cross=self.cross, deterministic=self.deterministic)
        if cfg.scan_layers:
            scanned = nn.scan(block_cls, variable_axes={'params': 0, 'cache': 0},
                              split_rngs={'params': True, 'dropout': True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: 'layers'})
            x_BTD, _ = scanned(**kwargs, name='layers')(x_BTD, encoded_BSD, self_valid_BT, enc_valid_BS)
        else:
            for i in range(self.num_layers):
                x_BTD = block_cls(**kwargs, name=f'layer_{i}')(x_BTD, encoded_BSD, self_valid_BT, enc_valid_BS)
        if cfg.norm_position == 'pre':  # pre-norm leaves the residual stream unnormalised
            x_BTD = Norm(cfg.norm, dtype=dtype_of(cfg.dtype), name='final_norm')(x_BTD)
        return x_BTD


class _Embedder(nn.Module):
    """Token embedding (* sqrt(d)) + positions + dropout; positions come from a cache
    counter while decoding token by token."""
    cfg: TransformerConfig
    embed: Embed
    deterministic: bool

    @nn.compact
    def __call__(self, tokens_BT):
        cfg = self.cfg
        x_BTD = self.embed(tokens_BT)
        positions = None
        if cfg.decode:
            index = self.variable('cache', 'position', lambda: jnp.array(0, jnp.int32))
            positions = (jnp.arange(tokens_BT.shape[1]) + index.value)[None]
            index.value = index.value + tokens_BT.shape[1]
        x_BTD = AddPositions(cfg.pos_encoding, cfg.max_len, cfg.d_model, dtype=dtype_of(cfg.dtype),
                             name='positions')(x_BTD, positions)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=self.deterministic)
        return constrain(x_BTD, ('act_batch', 'act_length', 'act_embed'))


def _embed(cfg: TransformerConfig, vocab: int, name: str) -> Embed:
    return Embed(vocab, cfg.d_model, scale=cfg.scale_embeddings, dtype=dtype_of(cfg.dtype), name=name,
                 scale_width=mup.embed_width(cfg.d_model, cfg.mup_base_width))


def _logits(cfg: TransformerConfig, x_BTD, shared: Embed | None, name: str = 'logits'):
    """Output projection to the vocabulary: the shared embedding's transpose or a Dense, its
    input times muP's readout multiplier (where it is not 1). Logits are float32; the
    softmax lives in the loss (`train/losses.py`)."""
    x_BTD = readout_input(cfg, x_BTD)
    if shared is not None:
        logits = shared.attend(x_BTD)
    else:
        logits = Dense(cfg.num_outputs, ('embed', 'vocab'), dtype=dtype_of(cfg.dtype), name=name)(x_BTD)
    return constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))


def readout_input(cfg: Any, x: jax.Array) -> jax.Array:
    """x times `cfg.readout_multiplier` (muP's base_width / width: MuReadout's), or x
    itself where that is 1 (the standard parametrisation, or muP at its base width)."""
    multiplier = cfg.readout_multiplier
    return x if multiplier == 1.0 else x * jnp.asarray(multiplier, x.dtype)


def shift_right(targets_BT: jax.Array, bos_id: int) -> jax.Array:
    """Decoder inputs for teacher forcing: [bos, y0, y1, ..., y_{T-2}]."""
    return jnp.concatenate([jnp.full_like(targets_BT[:, :1], bos_id), targets_BT[:, :-1]], axis=1)


class DecoderOnly(nn.Module):
    """Causal language model: logits [B, T, V] for next-token prediction on `inputs`.

    Built with cfg.decode, each call continues from the cached prefix (KV cache and
    position counter in the 'cache' collection), one or more tokens at a time.
    causal=False is EncoderMLM: the same model over a bidirectional stack named 'encoder'.
    """
    cfg: TransformerConfig
    causal: bool = True

    @nn.compact
    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        cfg = self.cfg
        tokens_BT = batch['inputs']
        embed = _embed(cfg, cfg.vocab_size, 'embed')
        x = _Embedder(cfg, embed, not train, name='embedder')(tokens_BT)
        x = Stack(cfg, cfg.num_layers, causal=self.causal, cross=False, deterministic=not train,
                  name='decoder' if self.causal else 'encoder')(x, None, tokens_BT != cfg.pad_id)
        return _logits(cfg, x, embed if cfg.share_embeddings else None)


class EncoderDecoder(nn.Module):
    """The paper's model: encoder over `inputs`, decoder over shifted `targets`.

    mode='full' (training, evaluation): logits [B, T, V] for batch['targets'] under teacher
    forcing. For decoding: mode='encode' returns (encoded_BSD, valid_BS); mode='decode'
    takes them back as `encoded` and returns logits for batch['decoder_inputs'],
    continuing the cached prefix when built with cfg.decode.
    """
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False, mode: str = 'full',
                 encoded: tuple[jax.Array, jax.Array] | None = None):
        cfg = self.cfg
        src_embed = _embed(cfg, cfg.vocab_size, 'embed')
        tgt_embed = src_embed if cfg.share_embeddings else _embed(cfg, cfg.num_outputs, 'target_embed')
        if mode in ('full', 'encode'):
            inputs_BS = batch['inputs']
            enc_valid = inputs_BS != cfg.pad_id
            enc_cfg = dataclasses.replace(cfg, decode=False)
            x = _Embedder(enc_cfg, src_embed, not train, name='encoder_embedder')(inputs_BS)
            x = Stack(enc_cfg, cfg.encoder_layers, causal=False, cross=False, deterministic=not train,
                      name='encoder')(x, None, enc_valid)
            encoded = (x, enc_valid)
            if mode == 'encode':
                return encoded
        tokens_BT = batch['decoder_inputs'] if mode == 'decode' else shift_right(batch['targets'], cfg.bos_id)
        x = _Embedder(cfg, tgt_embed, not train, name='decoder_embedder')(tokens_BT)
        x = Stack(cfg, cfg.num_layers, causal=True, cross=True, deterministic=not train, name='decoder')(
            x, encoded[0], None, encoded[1])
        return _logits(cfg, x, tgt_embed if cfg.share_embeddings else None)


class EncoderMLM(DecoderOnly):
    """Bidirectional encoder + vocabulary projection: logits [B, T, V] at every position
    (the loss counts the masked ones). Parameters as in EncoderClassifier up to the head."""
    causal: bool = False


class EncoderClassifier(nn.Module):
    """Encoder + pooling + head: logits [B, C] (classify) or predictions [B] (regress).
    causal=True: a causal stack named 'decoder', as in DecoderOnly (decoder_classifier);
    pool it with model.pooling=last (the one position that has read every token)."""
    cfg: TransformerConfig
    regression: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        cfg = self.cfg
        tokens = batch['inputs']
        valid = tokens != cfg.pad_id
        x = _Embedder(cfg, _embed(cfg, cfg.vocab_size, 'embed'), not train, name='embedder')(tokens)
        x = Stack(cfg, cfg.num_layers, causal=self.causal, cross=False, deterministic=not train,
                  name='decoder' if self.causal else 'encoder')(x, None, valid)
        pooled = readout_input(cfg, pool(x, valid, cfg.pooling).astype(jnp.float32))
        out = Dense(cfg.num_outputs, ('embed', None), dtype=jnp.float32, name='head')(pooled)
        return out[:, 0] if self.regression else out


def pool(x_BTD: jax.Array, valid_BT: jax.Array, how: str) -> jax.Array:
    """Sequence summary [B, D]: mean over valid positions, the first, or the last valid one."""
    if how == 'mean':
        w = valid_BT.astype(x_BTD.dtype)[..., None]
        return (x_BTD * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    if how == 'first':
        return x_BTD[:, 0]
    if how == 'last':
        last = jnp.maximum(valid_BT.sum(1) - 1, 0)
        return jnp.take_along_axis(x_BTD, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f'unknown pooling {how}')
