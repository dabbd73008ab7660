"""The `model.*` config fields: those every family reads (SHARED), then each family's own.

`config.base_config` builds one flat `config.model` from them (`declared()`), so a user
sets any family's knob the same way (`--config.model.la_decay=gated`) and a run's
config.json holds every field. A new family declares its knobs here, in a block listed
under its registry name in BY_FAMILY; its `resolve` reads them from the model dict.

This module imports nothing (no jax): reading a config never imports the models.
A value that is a type (`int`) declares a field left unset (None) until set, of that
type; `resolve` then gives it the family's default or the size row's value.
"""

from __future__ import annotations

from typing import Any, Mapping

# Every family: which model, its size and shape, the width of the matched families,
# and what every stack has (dropout, channel mixer, norms, embeddings, dtype, pooling).
SHARED: Mapping[str, Any] = dict(
    name='transformer',  # registry name: transformer | rnn | lstm | gru | linear_attention | mamba | mingru
    size='tiny',  # a row of SIZES; unset (None) fields below take its values
    arch='auto',  # auto picks the shape the task needs; or decoder_only | encoder_decoder | encoder_classifier
    # The size row's Transformer, which every other family's width is matched to:
    num_layers=int,
    encoder_layers=int,  # encoder-decoder only; default num_layers
    d_model=int,
    num_heads=int,  # the Transformer's and linear_attention's heads
    num_kv_heads=int,  # < num_heads: grouped-query attention; 1: multi-query
    d_ff=int,
    hidden=int,  # recurrent and fixed-state width; unset: parameter-matched to `size`
    width_multiple=int,  # a matched width is a multiple of this (1: any); unset: 8, or 4, 2 at small widths
    dropout=float,  # residual, embedding and between-layer dropout (default 0)
    ffn=str,  # relu | gelu | swiglu (default relu)
    norm='layernorm',  # layernorm | rmsnorm
    share_embeddings=True,  # one table for input(s) and output projection
    scale_embeddings=True,  # multiply embeddings by sqrt(d_model), as in the paper
    dtype='float32',  # compute dtype: float32 | bfloat16 (parameters stay float32)
    pooling='mean',  # classifiers: mean | first | last
)

# transformer_family
TRANSFORMER: Mapping[str, Any] = dict(
    attention_dropout=0.0,
    pos_encoding=str,  # sinusoidal | learned | rotary | none (default sinusoidal)
    max_len=int,  # position table size; unset: the longest sequence the run sees
    attention_impl='einsum',  # einsum (reference) | xla (jax.nn.dot_product_attention) | blockwise
    attention_block_size=128,  # key/query block for attention_impl=blockwise
    norm_position=str,  # pre | post (the paper's); default pre
    scan_layers=bool,  # nn.scan over layers (flat compile time in depth); unset: by depth and backend
    remat='none',  # none | full | dots (what nn.remat saves in each layer)
)

# recurrent_family: rnn, lstm, gru
RECURRENT: Mapping[str, Any] = dict(
    bidirectional=False,  # recurrent encoders
    residual=False,  # residual connections between stacked layers
    rnn_attention='none',  # seq2seq: none | bahdanau | luong
    unroll=1,  # scan unroll
)

# fixed_state_family: linear_attention, mamba, mingru (model.hidden is their width, matched
# like rnn/lstm/gru's)
FIXED_STATE: Mapping[str, Any] = dict(
    mlp_expand=int,  # channel mixer (model.ffn) width / hidden; 0: none (default 4; mamba 0)
)

# linear_attention
LINEAR_ATTENTION: Mapping[str, Any] = dict(
    la_feature_map='elu',  # elu (elu + 1, normalised) | identity (RetNet's, GLA's)
    # none | fixed (a fixed per-head exponential decay, as RetNet's without its xPos rotation)
    # | gated (GLA's data-dependent decay)
    la_decay='none',
    chunk_size=16,  # tokens per chunk of the chunked parallel (training) form
)

# mamba
MAMBA: Mapping[str, Any] = dict(
    ssm_state=16,  # state size N per channel
    ssm_conv=4,  # width of the causal depthwise convolution
    ssm_expand=2,  # inner channels / hidden
)

# mingru
MINGRU: Mapping[str, Any] = dict(
    mingru_expand=1,  # recurrent width / hidden (> 1 adds an output projection)
)

# Registry name -> the knobs that family reads beyond SHARED.
BY_FAMILY: Mapping[str, tuple[Mapping[str, Any], ...]] = {
    'transformer': (TRANSFORMER,),
    'rnn': (RECURRENT,), 'lstm': (RECURRENT,), 'gru': (RECURRENT,),
    'linear_attention': (FIXED_STATE, LINEAR_ATTENTION),
    'mamba': (FIXED_STATE, MAMBA),
    'mingru': (FIXED_STATE, MINGRU),
}


def declared() -> dict[str, Any]:
    """Every model field once: SHARED, then each family's blocks in BY_FAMILY's order
    (a block several families share counts once). A field declared by two blocks is a
    mistake in this file: it raises."""
    out, seen = dict(SHARED), [SHARED]
    for block in (b for blocks in BY_FAMILY.values() for b in blocks):
        if any(block is b for b in seen):
            continue
        seen.append(block)
        twice = sorted(set(block) & set(out))
        if twice:
            raise ValueError(f"model.{twice[0]} is declared twice in models/knobs.py")
        out.update(block)
    return out


def defaults(family: str) -> dict[str, Any]:
    """The values a family's own knobs default to (the unset ones left out): what its
    `resolve` gives a field that a caller's model dict leaves None."""
    return {k: v for block in BY_FAMILY[family] for k, v in block.items() if not isinstance(v, type)}
