"""The maximal update parametrisation (muP) for Adam: its forward-pass multipliers, and
what the literature does and does not establish for each family here.

`optim.parametrization=mup` with `optim.base_width=B` makes a model of width W (the
Transformer's `d_model`; `model.hidden` for rnn, lstm, gru, linear_attention, mamba and
mingru) train like the model of width B, so that a learning rate tuned at width B holds
at W (Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
Hyperparameter Transfer"). With m = W / B:

  hidden matrices     Adam learning rate x 1/m (train/optimizer.py: HIDDEN names them);
                      SP's fan-based initialisation
  readout             logits = (x / m) W_out, for the tied embedding table and a separate
                      head alike (`readout_multiplier`); learning rate x 1
  attention logits    q.k * sqrt(d_head_base) / d_head instead of q.k / sqrt(d_head):
                      queries multiplied by sqrt(1/m) (`query_multiplier`), so the 1/d rule
                      is exact relative to the base and 1/sqrt(d) at it
  input embeddings    std 1/sqrt(B) at initialisation and (with model.scale_embeddings)
                      multiplied by sqrt(B) where SP uses W (`embed_width`): coordinates of
                      the same size at every width, and updates too; learning rate x 1
  vectors             biases, norm scales, Mamba's A_log / D / dt_bias / conv_kernel, the
                      learned position table: learning rate x 1
  weight decay        decoupled and applied with peak * schedule, never with the 1/m
                      multiplier (as microsoft/mup's MuAdamW, which keeps lr * wd fixed)

Every multiplier is exactly 1 at m = 1 and the code skips it there, so `mup` at its base
width computes `sp`'s numbers bit for bit (tests/test_mup.py checks the losses of a few
steps). `base_width` (the model of width B, same depth and head count) is the reference;
the base model's head dimension is d_head * B / W.

Formulation: Table 8 of Tensor Programs V, the form microsoft/mup implements (MuReadout's
1/m forward multiplier with the readout at the base rate; MuAdam's 1/m Adam rate on
matrices whose two dimensions grow; 1/d attention). Where this one differs:
  - one ratio m for the whole model (W / B) instead of each matrix's own fan-in ratio
    (mup's `set_base_shapes`): every hidden dimension is assumed to grow with W (d_ff a
    fixed multiple of d_model, a fixed head count, Mamba's and minGRU's inner widths
    `ssm_expand` / `mingru_expand` times hidden). experiments/coord_check.py and
    lr_transfer.py scale d_ff with d_model.
  - the readout keeps SP's initialisation: at initialisation a separate head's logits
    shrink like 1/m and the tied table's like 1/sqrt(m) (mup rescales MuReadout's weight
    by sqrt(m); its readout_zero_init is the limit of both). They grow back to O(1) within
    a few steps (the coordinate check measures after them).
  - queries are not zero-initialised (mup's README suggests it, optional).
  - the learning-rate rule is decided by parameter name (train/optimizer.py), not found
    from shapes; tests/test_mup.py checks the names against mup's shape rule (a matrix is
    hidden when two of its dimensions change between two widths).

The families, and how far the literature carries each:
  - Transformer: hidden = attention query/key/value/out and the feed-forward's wi,
    wi_gate, wi_up, wo. Tensor Programs V verifies transfer on Transformers and ResNets.
  - RNN, LSTM, GRU: hidden = w_ih and w_hh (the recurrent seq2seq's bridges, Luong's
    score/combine and Bahdanau's w_q/w_k too). The Tensor Programs language expresses
    RNNs, GRUs and LSTMs (Yang 2019, "Tensor Programs I: Wide Feedforward or Recurrent
    Neural Networks of Any Architecture are Gaussian Processes": their limit at
    initialisation), and Yang & Littwin (2023, "Tensor Programs IVb: Adaptive Optimization
    in the Infinite-Width Limit") derive the maximal-update limit of Adam for any
    architecture it expresses, at a fixed number of time steps. So muP's scalings are
    derived for recurrent nets; but Tensor Programs V's transfer experiments contain no
    recurrent net, and we know of no published test of learning-rate transfer for
    LSTMs or GRUs under muP: here it is a hypothesis (experiments/lr_transfer.py can test
    it), not a result. The seq2seq attention scores (Bahdanau's v, Luong's product) keep
    SP's form: no 1/width rule is applied to them.
  - Mamba: hidden = in_proj, x_proj, dt_proj, out_proj. Vankadara, Xu, Haas & Cevher
    (NeurIPS 2024, "On Feature Learning in Structured State Space Models") show that muP
    and the spectral scaling condition fail to give feature learning in Mamba's SSM layers
    (its structured state and selection are not representable as Tensor Programs) and
    derive another scaling (muP-SSM) under which learning rates transfer. That scaling is
    not implemented here: `mup` applies plain muP to Mamba's projections, the recipe
    reported not to transfer, kept for comparison.
  - linear attention: hidden = query/key/value/out/output_gate and GLA's gate_down;
    gate_up (fan-in GATE_RANK = 16, fixed) is an input weight at the base rate. Its
    1/sqrt(d_k) query scale cancels in the normaliser (elu: o / phi(q).z; identity: the
    per-head RMS norm), so the 1/d attention rule has nothing to act on.
  - minGRU: hidden = gates (W_z; W_h) and out.
  For linear attention and minGRU we know of no muP analysis: the Transformer's rules are
  applied by analogy (their mixers are Dense projections around elementwise or normalised
  recurrences).
"""

from __future__ import annotations

import math


def ratio(width: int, base_width: int | None) -> float:
    """m = width / base_width (1.0 under the standard parametrisation, base_width None)."""
    return 1.0 if base_width is None else width / base_width


def readout_multiplier(width: int, base_width: int | None) -> float:
    """What the readout's input is multiplied by: base_width / width (1.0 under SP)."""
    return 1.0 if base_width is None else base_width / width


def query_multiplier(width: int, base_width: int | None) -> float:
    """What queries are multiplied by before the usual 1/sqrt(d_head): sqrt(base / width),
    so that the logits' scale is sqrt(d_head_base) / d_head (1.0 under SP)."""
    return 1.0 if base_width is None else math.sqrt(base_width / width)


def embed_width(width: int, base_width: int | None) -> int:
    """The width an embedding table's std (1/sqrt) and multiplier (sqrt) are computed from."""
    return width if base_width is None else base_width
