"""Training throughput of our LSTM language model against PyTorch's `nn.LSTM`, same run.

    python experiments/bench_lstm_vs_torch.py                      # the default sizes
    python experiments/bench_lstm_vs_torch.py --preset=all         # every preset below
    python experiments/bench_lstm_vs_torch.py --hidden=512 --vocab=10000 --seq_len=64
    python experiments/bench_lstm_vs_torch.py --part=layer_fwd     # one layer's forward pass alone

Both sides train the same model: token embedding [V, H] -> `layers` LSTM layers of width
H -> output projection [H, V] (+ bias), softmax cross-entropy over every position, Adam,
on the same batch of random tokens, with the same number of CPU threads. A step is
forward + backward + optimizer update; tokens/s = batch * seq_len / step time.
`--part=layer` times one LSTM layer alone (forward + backward of sum(h * r) on random
inputs: no embedding, softmax or optimizer), `--part=layer_fwd` its forward pass alone
(PyTorch under no_grad): where a gap comes from. Timed
rounds alternate between the two (so that load from other processes hits both alike);
the ratio is of the medians (the best rounds are printed too). Each side runs in its own
process (one at a time), so the two runtimes' thread pools never compete.

Memory: XLA:CPU takes each step's temporaries as one large allocation (~150 MB here) that
glibc maps fresh every step; faulting its pages in costs ~10% of the step. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (a documented glibc tunable: malloc advises
transparent huge pages) that drops to a few hundred faults. The benchmark sets it for
both sides alike (`--hugepages=0` to compare without). torch is optional
(`pip install torch`); without it only our side is timed. This is a benchmark, not a
test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

PRESETS = {
    # name: (vocab, hidden, layers, batch, seq_len)
    'default': (1024, 256, 2, 32, 128),
    'small': (256, 128, 2, 32, 128),  # the scale of the long-range tasks' models
    'large': (10000, 512, 2, 32, 64),  # a word-level language model
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--preset', default='default', choices=[*PRESETS, 'all'])
    for name in ('vocab', 'hidden', 'layers', 'batch', 'seq_len'):
        p.add_argument(f'--{name}', type=int, default=None, help='overrides the preset')
    p.add_argument('--steps', type=int, default=5, help='training steps per timed round')
    p.add_argument('--rounds', type=int, default=5, help='timed rounds per side (alternating)')
    p.add_argument('--threads', type=int, default=os.cpu_count(),
                   help="PyTorch's intra-op threads (XLA uses every core: keep the default to compare alike)")
    p.add_argument('--unroll', type=int, default=1, help='our scan unroll (model.unroll)')
    p.add_argument('--part', default='model', choices=('model', 'layer', 'layer_fwd'),
                   help='model: the whole training step; layer / layer_fwd: one LSTM layer alone')
    p.add_argument('--no_torch', action='store_true')
    p.add_argument('--hugepages', type=int, default=1,
                   help='1: both sides run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see the docstring)')
    return p.parse_args()


def ours(vocab, hidden, layers, batch, seq_len, unroll, tokens, part='model'):
    """A jitted train step of flaxformer_lite's RecurrentLM and its state."""
    import jax
    import jax.numpy as jnp
    import optax

    if part != 'model':
        return _our_layer(hidden, batch, seq_len, unroll, part)
    from flaxformer_lite.models.recurrent import RecurrentConfig, RecurrentLM

    cfg = RecurrentConfig(cell='lstm', vocab_size=vocab, num_outputs=vocab, num_layers=layers,
                          encoder_layers=layers, hidden=hidden, share_embeddings=False,
                          scale_embeddings=False, unroll=unroll)
    model = RecurrentLM(cfg)
    tokens = jnp.asarray(tokens.T)  # [B, T+1]
    params = jax.jit(model.init)(jax.random.key(0), {'inputs': tokens[:, :-1]})['params']
    opt = optax.adam(1e-3)

    def loss_fn(params, tokens):
        logits = model.apply({'params': params}, {'inputs': tokens[:, :-1]})
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=0)
    state = [(params, opt.init(params))]

    def run(n):
        loss = None
        for _ in range(n):
            state[0], loss = step(state[0], tokens)
        return float(loss)  # blocks until the last step is done

    return run


def _layer_inputs(hidden, batch, seq_len):
    """x [T, B, H] and the cotangent r of the layer's output, the same on both sides."""
    import numpy as np
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((seq_len, batch, hidden)).astype(np.float32) for _ in range(2))


def _our_layer(hidden, batch, seq_len, unroll, part):
    import jax
    import jax.numpy as jnp

    from flaxformer_lite.models.recurrent_cells import RecurrentLayer

    x, r = (jnp.asarray(a) for a in _layer_inputs(hidden, batch, seq_len))
    layer = RecurrentLayer(cell='lstm', in_features=hidden, hidden=hidden, unroll=unroll)
    params = layer.init(jax.random.key(0), x)

    def loss(params, x):
        return jnp.sum(layer.apply(params, x)[0] * r)

    fn = jax.jit(loss if part == 'layer_fwd' else jax.grad(loss, argnums=(0, 1)))

    def run(n):
        out = None
        for _ in range(n):
            out = fn(params, x)
        return float(jax.tree.leaves(out)[0].ravel()[0])  # blocks until the last call is done

    return run


def _torch_layer(hidden, batch, seq_len, part):
    import torch

    x, r = (torch.from_numpy(a) for a in _layer_inputs(hidden, batch, seq_len))
    x.requires_grad_(part == 'layer')
    lstm = torch.nn.LSTM(hidden, hidden, 1)

    def run(n):
        out = None
        for _ in range(n):
            if part == 'layer_fwd':
                with torch.no_grad():
                    out = (lstm(x)[0] * r).sum()
            else:
                lstm.zero_grad(set_to_none=True)
                x.grad = None
                out = (lstm(x)[0] * r).sum()
                out.backward()
        return out.item()

    return run


def torch_side(vocab, hidden, layers, batch, seq_len, threads, tokens, part='model'):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if part != 'model':
        return _torch_layer(hidden, batch, seq_len, part)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.lstm = nn.LSTM(hidden, hidden, layers)  # time-major, like ours
            self.out = nn.Linear(hidden, vocab)

        def forward(self, x_TB):
            y, _ = self.lstm(self.embed(x_TB))
            return self.out(y)

    model = LM()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    tokens = torch.from_numpy(tokens).long()  # [T+1, B]

    def run(n):
        loss = None
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            logits = model(tokens[:-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[1:].reshape(-1))
            loss.backward()
            opt.step()
        return loss.item()

    return run


def _worker(side, sizes, args, tokens, conn):
    """One side in its own process, so that the two runtimes' thread pools (XLA's and
    PyTorch's OpenMP) never compete for the cores: each round runs alone."""
    if side == 'ours':
        run = ours(*sizes, args.unroll, tokens, args.part)
    else:
        run = torch_side(*sizes, args.threads, tokens, args.part)
    first = (run(1), run(2))  # compile / warm up; a model starts near log(vocab)
    conn.send(first)
    while (n := conn.recv()) is not None:
        start = time.perf_counter()
        run(n)
        conn.send(time.perf_counter() - start)


def bench(name, sizes, args) -> float | None:
    import multiprocessing as mp

    import numpy as np

    vocab, hidden, layers, batch, seq_len = sizes
    tokens = np.random.default_rng(0).integers(0, vocab, size=(seq_len + 1, batch)).astype(np.int32)
    labels = {'ours': 'flaxformer_lite (JAX)', 'torch': 'PyTorch nn.LSTM'}
    sides = ['ours']
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            sides.append('torch')
        except ImportError:
            print('torch is not installed: timing our side only (pip install torch)')
    print(f'\n[{name}] vocab={vocab} hidden={hidden} layers={layers} batch={batch} seq_len={seq_len} '
          f'threads={args.threads} unroll={args.unroll} steps/round={args.steps} hugepages={args.hugepages} '
          f'part={args.part}',
          flush=True)
    if args.hugepages:  # read by glibc at process start: set before the workers are spawned
        os.environ['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'
    else:
        os.environ.pop('GLIBC_TUNABLES', None)
    ctx = mp.get_context('spawn')
    conns, procs = {}, []
    for side in sides:  # start one at a time: compiling is timed by nobody but should not overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(side, sizes, args, tokens, child), daemon=True)
        proc.start()
        first = parent.recv()
        what = 'first losses' if args.part == 'model' else 'first outputs'
        print(f'  {labels[side]:24s} {what}: {first[0]:.3f} -> {first[1]:.3f}', flush=True)
        conns[side] = parent
        procs.append(proc)
    rates = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            time.sleep(0.2)  # let the other side's threads go idle
            conns[side].send(args.steps)
            rates[side].append(batch * seq_len * args.steps / conns[side].recv())
    for side in sides:
        conns[side].send(None)
    for proc in procs:
        proc.join()
    for side, r in rates.items():
        print(f'  {labels[side]:24s} tokens/s: median {statistics.median(r):9.0f}   best {max(r):9.0f}   '
              f'rounds {" ".join(f"{x:.0f}" for x in r)}')
    if len(rates) < 2:
        return None
    ra, rb = rates['ours'], rates['torch']
    ratio = statistics.median(ra) / statistics.median(rb)
    print(f'  ratio ours / PyTorch: {ratio:.2f}x (median)   {max(ra) / max(rb):.2f}x (best)', flush=True)
    return ratio


def main() -> None:
    args = parse()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    names = list(PRESETS) if args.preset == 'all' else [args.preset]
    for name in names:
        sizes = list(PRESETS[name])
        for i, field in enumerate(('vocab', 'hidden', 'layers', 'batch', 'seq_len')):
            if getattr(args, field) is not None:
                sizes[i] = getattr(args, field)
        bench(name, tuple(sizes), args)


if __name__ == '__main__':
    main()
