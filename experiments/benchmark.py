"""Training throughput against PyTorch eager and against this machine's own matmul ceiling.

    python3 experiments/benchmark.py                                     # every CPU reference config
    python3 experiments/benchmark.py --configs=t256,t512 --rounds=7 --out=/tmp/bench.json
    python3 experiments/benchmark.py --configs=long4k,long8k,long16k --rounds=2 --steps=1
    python3 experiments/benchmark.py --configs=lstm256x3 --set=model.unroll=2   # a lever, any config field
    bash experiments/gpu_benchmark.sh                                    # 125M / 350M / 1B on one GPU

Our side trains through the project's own path: the family's `build`, `train/setup.py`'s
state and shardings, `train/step.py`'s step with the optimizer of `train/optimizer.py`,
jitted by the same `train.setup.jit_train_step` as the loop, on real batches of the task. PyTorch's side
(optional: `pip install torch`; skipped without it) trains the same model in eager mode:
`nn.TransformerEncoder` (pre-norm, GELU, causal mask, tied embeddings) or `nn.LSTM`, with
AdamW and global-norm clipping, same batch, same thread count. Each side runs in its own
process (the two runtimes' thread pools never compete) and timed rounds alternate, the
matmul ceiling measured between them, so that load from other processes hits all alike:
read the per-round ratios, not a lone absolute time.

Columns: compile time of the train step; median step time; training tokens/s; model
FLOP/s in `accounting.py`'s convention (the family's `flops_per_example`, which the tests
check against XLA's count); MFU against the same run's matmul ceiling (per round, then the
median) and, where `accounting.peak_flops` knows the device, against the datasheet peak;
peak memory (host RSS on CPU, device peak bytes on GPU); PyTorch's tokens/s and the ratio
ours / PyTorch (of the medians; of the best rounds, the quietest moment of a
shared machine; and the per-round ratios' range). XLA's per-step
temporaries are large allocations that glibc maps afresh each step; both sides run with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`--hugepages=0` to compare without). A benchmark,
not a test: it prints measured ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


@dataclasses.dataclass(frozen=True)
class Bench:
    """One reference config: a task, model fields and a batch, as config overrides."""
    name: str
    task: str
    fields: tuple[tuple[str, Any], ...]
    torch: bool = True  # PyTorch has the same model

    def overrides(self) -> dict[str, Any]:
        return dict(self.fields)


def _transformer(name, width, heads, d_ff, layers, seq, batch, task='text_lm', torch=True, **extra) -> Bench:
    fields = {'model.name': 'transformer', 'model.num_layers': layers, 'model.d_model': width,
              'model.num_heads': heads, 'model.d_ff': d_ff, 'model.ffn': 'gelu', 'task.seq_len': seq,
              'train.batch_size': batch, **extra}
    return Bench(name, task, tuple(fields.items()), torch)


def _lstm(width, layers) -> Bench:
    fields = {'model.name': 'lstm', 'model.hidden': width, 'model.num_layers': layers,
              'model.share_embeddings': False, 'model.scale_embeddings': False, 'task.seq_len': 128,
              'train.batch_size': 32}
    return Bench(f'lstm{width}x{layers}', 'text_lm', tuple(fields.items()))


CONFIGS: dict[str, Bench] = {b.name: b for b in [
    _transformer('t256', 256, 4, 1024, 4, 256, 16),
    _transformer('t512', 512, 8, 2048, 4, 256, 8),
    *[_transformer(f'long{n // 1024}k', 256, 4, 1024, 2, n, 1, torch=False, **{'model.attention_impl': 'blockwise'})
      for n in (4096, 8192, 16384)],
    *[_lstm(w, n) for w in (256, 512) for n in (1, 2, 3)],
    *[_transformer(f'depth{n}_{"scan" if scan else "unrolled"}', 256, 4, 1024, n, 128, 4, torch=False,
                   **{'model.scan_layers': scan}) for n in (2, 24) for scan in (True, False)],
    _transformer('encdec', 256, 4, 1024, 2, 64, 16, task='seq2seq', torch=False),
    # GPU (experiments/gpu_benchmark.sh): the size table's base / large / 1b rows, bfloat16.
    *[_transformer(name, w, h, 4 * w, n, 2048, b, torch=False,
                   **{'model.attention_impl': 'xla', 'model.dtype': 'bfloat16', 'model.scan_layers': True})
      for name, n, w, h, b in (('gpu125m', 12, 768, 12, 16), ('gpu350m', 24, 1024, 16, 16),
                               ('gpu1b', 24, 2048, 16, 8))],
    # For the suite: seconds to compile and run.
    _transformer('tiny', 32, 2, 64, 1, 16, 2),
    Bench('tiny_lstm', 'text_lm', (('model.name', 'lstm'), ('model.hidden', 16), ('model.num_layers', 1),
                                   ('task.seq_len', 16), ('train.batch_size', 2))),
]}
CPU_DEFAULT = ('t256', 't512', 'lstm256x1', 'lstm256x2', 'lstm256x3', 'lstm512x1', 'lstm512x2', 'lstm512x3',
               'depth2_scan', 'depth24_scan', 'depth2_unrolled', 'depth24_unrolled', 'encdec',
               'long4k', 'long8k', 'long16k')


def experiment_of(bench: Bench, settings: dict[str, Any] | None = None):
    """The resolved `Run` of a reference config (plus `--set` overrides)."""
    from flaxformer_lite import config as config_lib, resolve

    cfg = config_lib.base_config(bench.task)
    cfg.model.size = 'tiny'  # every shape field is set explicitly
    for key, value in {**bench.overrides(), **(settings or {})}.items():
        config_lib.set_field(cfg, key, value)
    cfg.lock()
    return resolve.from_config(cfg)


def batch_of(exp) -> dict[str, Any]:
    """`train.batch_size` real training examples, stacked (numpy)."""
    import numpy as np
    examples = [exp.task.example('train', i) for i in range(exp.config.train.batch_size)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class Ours:
    """flaxformer_lite's train step, compiled; `steps(n)` times n steps with no host sync
    until the last, `ceiling()` times a matmul in the compute dtype."""

    def __init__(self, bench: Bench, settings: dict[str, Any]):
        import flax.linen as nn
        import jax

        from flaxformer_lite import sharding
        from flaxformer_lite.train import setup as setup_lib, step as step_lib

        self.jax = jax
        exp = experiment_of(bench, settings)
        cfg = exp.config
        setup = setup_lib.build(exp)
        self.dtype = cfg.model.dtype
        rep = sharding.replicated(setup.mesh)
        step = setup_lib.jit_train_step(setup, cfg, exp.spec.kind)  # the loop's own jitted step
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            self.state = setup.init_state()
            self.health = jax.jit(step_lib.initial_health, out_shardings=rep)()
            self.batch = jax.device_put(batch_of(exp), setup.batch_sharding)
            start = time.perf_counter()
            self.hparams = jax.device_put(setup.step_inputs(), rep)
            self.step = step.lower(self.state, self.batch, self.hparams, self.health).compile()
            self.compile_s = time.perf_counter() - start
        self._ceiling_fn = None

    def steps(self, n: int) -> float:
        metrics = None
        for _ in range(n):
            self.state, metrics, self.health = self.step(self.state, self.batch, self.hparams, self.health)
        return float(metrics['objective'])  # blocks until the last step is done

    def ceiling(self) -> float:
        """FLOP/s of a square matmul (the best of 3 bursts of 5): what one device can do now."""
        jax, jnp = self.jax, self.jax.numpy
        gpu = jax.devices()[0].platform != 'cpu'
        n = 8192 if gpu else 1024
        if self._ceiling_fn is None:
            dtype = jnp.bfloat16 if self.dtype == 'bfloat16' else jnp.float32
            keys = jax.random.split(jax.random.key(0))
            self._ab = [jax.random.normal(k, (n, n), dtype) for k in keys]
            self._ceiling_fn = jax.jit(jnp.dot)
            self._ceiling_fn(*self._ab).block_until_ready()
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            out = [self._ceiling_fn(*self._ab) for _ in range(5)]
            jax.block_until_ready(out)
            best = max(best, 5 * 2 * n ** 3 / (time.perf_counter() - start))
        return best

    def memory(self) -> dict[str, Any]:
        from flaxformer_lite import accounting
        device = self.jax.devices()[0]
        stats = device.memory_stats() or {}
        peak = stats.get('peak_bytes_in_use')
        kind = 'device' if peak is not None else 'host RSS'
        if peak is None:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return dict(peak_memory_bytes=peak, memory_kind=kind, device=device.device_kind,
                    peak_flops=accounting.peak_flops(self.dtype, device))


def torch_available() -> bool:
    return importlib.util.find_spec('torch') is not None


def torch_version() -> str | None:
    if not torch_available():
        return None
    import torch
    return torch.__version__


class TorchSide:
    """The same model in PyTorch eager: `nn.TransformerEncoder` (pre-norm, GELU, causal
    mask, sinusoidal positions, embeddings tied to the output) or embedding -> `nn.LSTM`
    -> linear; AdamW with our optimizer's settings and global-norm clipping."""

    def __init__(self, exp, batch: dict[str, Any], threads: int):
        import torch
        from torch import nn

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m, spec, optim = exp.model_cfg, exp.spec, exp.config.optim
        self.x, self.y = (torch.from_numpy(batch[k]).long() for k in ('inputs', 'targets'))
        self.vocab = spec.num_outputs
        self.model = _torch_lm(m, spec) if exp.family.name == 'transformer' else _torch_lstm(m, spec)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=optim.learning_rate, betas=(optim.b1, optim.b2),
                                     eps=optim.eps, weight_decay=optim.weight_decay)
        self.clip, self.torch = optim.grad_clip, torch

    def steps(self, n: int) -> float:
        loss = None
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            logits = self.model(self.x)
            loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), self.y.reshape(-1))
            loss.backward()
            if self.clip > 0:
                self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
        return loss.item()


def _torch_lm(m, spec):
    import torch
    from torch import nn

    d, t = m['d_model'], spec.input_len

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(spec.vocab_size, d)
            layer = nn.TransformerEncoderLayer(d, m['num_heads'], m['d_ff'], dropout=0.0, activation='gelu',
                                               batch_first=True, norm_first=True)
            self.stack = nn.TransformerEncoder(layer, m['num_layers'], norm=nn.LayerNorm(d),
                                               enable_nested_tensor=False)
            pos = torch.arange(t)[:, None] / torch.pow(10000.0, torch.arange(0, d, 2) / d)
            self.register_buffer('pos', torch.cat([torch.sin(pos), torch.cos(pos)], -1))
            self.register_buffer('mask', nn.Transformer.generate_square_subsequent_mask(t))

        def forward(self, x_BT):
            h = self.embed(x_BT) * math.sqrt(d) + self.pos
            return self.stack(h, mask=self.mask, is_causal=True) @ self.embed.weight.T

    return LM()


def _torch_lstm(m, spec):
    from torch import nn

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(spec.vocab_size, m['hidden'])
            self.lstm = nn.LSTM(m['hidden'], m['hidden'], m['num_layers'])  # time-major, like ours
            self.out = nn.Linear(m['hidden'], spec.num_outputs)

        def forward(self, x_BT):
            return self.out(self.lstm(self.embed(x_BT.T))[0]).transpose(0, 1)

    return LM()


def _side(name: str, bench: Bench, settings: dict[str, Any], threads: int):
    if name == 'ours':
        return Ours(bench, settings)
    exp = experiment_of(bench, settings)
    return TorchSide(exp, batch_of(exp), threads)


def _serve(name, bench, settings, threads, conn) -> None:
    """One side in its own process: build, compile, then answer ('steps', n) / ('ceiling',)."""
    side = _side(name, bench, settings, threads)
    conn.send(dict(compile_s=getattr(side, 'compile_s', None), first=(side.steps(1), side.steps(1))))
    while (msg := conn.recv()) is not None:
        start = time.perf_counter()
        value = side.steps(msg[1]) if msg[0] == 'steps' else side.ceiling()
        conn.send(value if msg[0] == 'ceiling' else time.perf_counter() - start)
    conn.send(side.memory() if hasattr(side, 'memory') else {})


class _Local:
    """The process protocol, in this process (the test suite's tiny configs)."""

    def __init__(self, side):
        self.side = side
        self.ready = dict(compile_s=getattr(side, 'compile_s', None), first=(side.steps(1), side.steps(1)))

    def ask(self, msg):
        if msg is None:
            return self.side.memory() if hasattr(self.side, 'memory') else {}
        start = time.perf_counter()
        value = self.side.steps(msg[1]) if msg[0] == 'steps' else self.side.ceiling()
        return value if msg[0] == 'ceiling' else time.perf_counter() - start


class _Remote:
    def __init__(self, name, bench, settings, threads):
        import multiprocessing as mp
        self.conn, child = mp.get_context('spawn').Pipe()
        self.proc = mp.get_context('spawn').Process(target=_serve, args=(name, bench, settings, threads, child),
                                                    daemon=True)
        self.proc.start()
        self.ready = self.conn.recv()

    def ask(self, msg):
        self.conn.send(msg)
        out = self.conn.recv()
        if msg is None:
            self.proc.join()
        return out


def _spread(values: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def run_config(bench: Bench, *, rounds: int = 5, steps: int = 3, use_torch: bool = True,
               settings: dict[str, Any] | None = None, threads: int | None = None,
               in_process: bool = False) -> dict[str, Any]:
    """Benchmark one config; returns its row (medians, spreads and every round)."""
    from flaxformer_lite import accounting

    settings = settings or {}
    threads = threads or os.cpu_count()
    exp = experiment_of(bench, settings)
    per_example = exp.family.flops_per_example(exp.model_cfg, exp.spec)
    batch, tokens = exp.config.train.batch_size, exp.tokens_per_example()
    names = ['ours'] + (['torch'] if use_torch and bench.torch and torch_available() else [])
    sides = {}
    for name in names:  # one at a time: compiling is not timed against the other
        sides[name] = (_Local(_side(name, bench, settings, threads)) if in_process
                       else _Remote(name, bench, settings, threads))
    times: dict[str, list[float]] = {name: [] for name in names}
    ceilings = []
    for _ in range(rounds):
        for name in names:
            time.sleep(0 if in_process else 0.2)  # let the other side's threads go idle
            times[name].append(sides[name].ask(('steps', steps)) / steps)
        ceilings.append(sides['ours'].ask(('ceiling',)))
    mem = sides['ours'].ask(None)
    for name in names[1:]:
        sides[name].ask(None)
    step_s = times['ours']
    flops_rate = [batch * per_example / t for t in step_s]
    row = dict(config=bench.name, family=exp.family.name, arch=exp.model_cfg.get('arch'),
               layers=exp.model_cfg['num_layers'],
               width=exp.model_cfg['d_model' if exp.family.name == 'transformer' else 'hidden'],
               seq_len=exp.spec.input_len, batch=batch, dtype=exp.config.model.dtype,
               settings=settings, flops_per_example=per_example, params=accounting.summary(exp)['params_total'],
               compile_s=sides['ours'].ready['compile_s'], first_losses=sides['ours'].ready['first'],
               step_s=_spread(step_s), tokens_per_s=_spread([batch * tokens / t for t in step_s]),
               model_flops_per_s=_spread(flops_rate), ceiling_flops_per_s=_spread(ceilings),
               mfu_ceiling=_spread([f / c for f, c in zip(flops_rate, ceilings)]), **mem,
               rounds=dict(step_s=step_s, ceiling=ceilings))
    row['mfu_peak'] = None if mem.get('peak_flops') is None else row['model_flops_per_s']['median'] / mem['peak_flops']
    if 'torch' in names:
        torch_rate = [batch * tokens / t for t in times['torch']]
        ours_rate = row['tokens_per_s']['median']
        row.update(torch_tokens_per_s=_spread(torch_rate), rounds=dict(row['rounds'], torch_step_s=times['torch']),
                   ratio=ours_rate / statistics.median(torch_rate),
                   ratio_rounds=_spread([t / o for o, t in zip(step_s, times['torch'])]),
                   ratio_best=min(times['torch']) / min(step_s))
    return row


COLUMNS = ('config', 'shape', 'compile s', 'step ms', 'tokens/s', 'GFLOP/s', 'ceiling GFLOP/s', 'MFU (ceiling)',
           'MFU (peak)', 'peak mem GB', 'PyTorch tokens/s', 'ours / PyTorch (median; best; rounds)')


def _fmt(x: float | None, spec: str) -> str:
    return '-' if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        shape = f"{r['family']} {r['layers']}x{r['width']}, T={r['seq_len']}, B={r['batch']}"
        shape += '' if r['dtype'] == 'float32' else f", {r['dtype']}"
        shape += ''.join(f', {k.split(".")[-1]}={v}' for k, v in r['settings'].items())
        ratio = '-'
        if 'ratio' in r:
            ratio = (f"{r['ratio']:.2f}x (best {r['ratio_best']:.2f}x; rounds {r['ratio_rounds']['min']:.2f}-"
                     f"{r['ratio_rounds']['max']:.2f})")
        cells = [r['config'], shape, _fmt(r['compile_s'], '.2f'), _fmt(r['step_s']['median'] * 1e3, '.1f'),
                 _fmt(r['tokens_per_s']['median'], ',.0f'), _fmt(r['model_flops_per_s']['median'] / 1e9, '.1f'),
                 _fmt(r['ceiling_flops_per_s']['median'] / 1e9, '.1f'), _fmt(r['mfu_ceiling']['median'], '.1%'),
                 _fmt(r['mfu_peak'], '.1%'), _fmt(r['peak_memory_bytes'] / 1e9, '.2f'),
                 _fmt(r.get('torch_tokens_per_s', {}).get('median'), ',.0f'), ratio]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def meta() -> dict[str, Any]:
    import jax
    return dict(date=time.strftime('%Y-%m-%d %H:%M'), command=' '.join(sys.argv), jax=jax.__version__,
                torch=torch_version(), host=platform.node(), cpus=os.cpu_count(),
                xla_flags=os.environ.get('XLA_FLAGS', ''), glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--configs', default=','.join(CPU_DEFAULT), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument('--rounds', type=int, default=5, help='timed rounds per side (alternating)')
    p.add_argument('--steps', type=int, default=3, help='training steps per timed round')
    p.add_argument('--set', default='', help='config overrides for every config: model.remat=dots,model.dtype=...')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help="PyTorch's threads (XLA uses every core)")
    p.add_argument('--no_torch', action='store_true')
    p.add_argument('--hugepages', type=int, default=1, help='1: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for both')
    p.add_argument('--in_process', action='store_true', help='no worker processes (tiny configs, tests)')
    p.add_argument('--out', default=None, help='also write the rows as JSON here')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    names = [n for n in args.configs.split(',') if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    settings = dict(kv.split('=', 1) for kv in args.set.split(',') if kv)
    if args.hugepages:  # read by glibc at process start: set before the workers are spawned
        os.environ['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'
    if not args.no_torch and not torch_available():
        print('torch is not installed: timing our side only (pip install torch)', flush=True)
    rows = []
    for name in names:
        rows.append(run_config(CONFIGS[name], rounds=args.rounds, steps=args.steps, use_torch=not args.no_torch,
                               settings=settings, threads=args.threads, in_process=args.in_process))
        r = rows[-1]
        note = f", ours/PyTorch {r['ratio']:.2f}x" if 'ratio' in r else ''
        print(f"{name}: compile {r['compile_s']:.1f} s, step {r['step_s']['median'] * 1e3:.1f} ms, "
              f"{r['tokens_per_s']['median']:,.0f} tokens/s{note}", flush=True)
    print('\n' + table(rows))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(meta=meta(), rows=rows), f, indent=1)
    return rows


if __name__ == '__main__':
    main()
