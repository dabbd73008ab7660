"""The one training loop: every model family and task runs through `train_and_evaluate`.

Order of work: check the workdir and build everything that can fail (mesh, shardings,
data) before writing a byte; initialise shape-first (`eval_shape` -> logical specs ->
mesh shardings -> `jit(init, out_shardings)`), or restore the latest checkpoint; then
loop without waiting for the device except at logging, evaluation and saving steps.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import accounting, data, parallel, tracking
from flaxformer_lite import config as config_lib
from flaxformer_lite.experiment import Experiment
from flaxformer_lite.train import checkpoint, optimizer, step as step_lib
from flaxformer_lite.train.losses import summarize
from flaxformer_lite.train.state import TrainState

INTERRUPTED = 'interrupted'


@dataclasses.dataclass
class Setup:
    """Everything built before the first step (and before anything is written)."""
    mesh: jax.sharding.Mesh
    rules: tuple
    rules_name: str
    model: nn.Module
    tx: Any
    lr: Any
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    init_fn: Any
    batch_sharding: Any
    notes: list[str]  # layout decisions worth a line at start-up


def build(exp: Experiment) -> Setup:
    """Mesh, model, optimizer and the state's shardings, derived shape-first."""
    cfg = exp.config
    mesh = parallel.make_mesh(cfg.mesh)
    rules_name = parallel.rules_preset(cfg.mesh, tuple(mesh.shape.values()))
    rules = parallel.logical_rules(cfg.mesh, tuple(mesh.shape.values()))
    batch_devices = mesh.shape['data'] * mesh.shape['fsdp']
    for field in ('train.batch_size', 'eval.batch_size'):
        value = config_lib.flatten(cfg.to_dict())[field]
        if value % batch_devices:
            raise config_lib.ConfigError(f'{field}={value} is not divisible by mesh data*fsdp={batch_devices}; '
                                         f'use a multiple of {batch_devices}')
    model = exp.family.build(exp.model_cfg, exp.spec)
    tx, lr = optimizer.make(cfg.optim, cfg.train.steps)
    example = exp.task.example('train', 0)
    dummy = {k: jnp.asarray(np.broadcast_to(v, (cfg.train.batch_size,) + v.shape)) for k, v in example.items()}
    rng = jax.random.key(cfg.train.seed)

    def init_params():
        return model.init({'params': rng}, dummy, train=False)['params']

    def init_fn():
        params = nn.unbox(init_params())
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_params)
        param_sh, notes = parallel.param_shardings(boxed, mesh, rules)
        abstract = jax.eval_shape(init_fn)
    opt_sh = parallel.opt_state_shardings(tx, abstract.opt_state, param_sh, mesh)
    state_sh = TrainState(step=parallel.replicated(mesh), params=param_sh, opt_state=opt_sh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Setup(mesh=mesh, rules=rules, rules_name=rules_name, model=model, tx=tx, lr=lr, state_shardings=state_sh,
                 abstract_state=abstract, init_fn=init_fn, batch_sharding=parallel.batch_sharding(mesh),
                 notes=notes)


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, step: int, every: int) -> bool:
        """Whether to stop after `step`. One process checks every step; several agree on
        it every `every` steps (a collective), since all of them must save together."""
        if jax.process_count() == 1:
            return self.signal is not None
        if step % every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.signal is not None))))


class Evaluator:
    """Held-out sets kept on device; metric sums added over batches, summarised on host."""

    def __init__(self, exp: Experiment, setup: Setup):
        cfg, pi, pc = exp.config, jax.process_index(), jax.process_count()
        self.kind = exp.spec.kind
        self.sets = {}
        for prefix, task in exp.eval_tasks.items():
            batches = data.eval_batches(task, num_examples=cfg.eval.num_examples, batch_size=cfg.eval.batch_size,
                                        process_index=pi, process_count=pc)
            self.sets[prefix] = (task, [data.to_global(b, setup.batch_sharding) for b in batches])
        param_sh = setup.state_shardings.params
        out_sh = parallel.replicated(setup.mesh)
        self.eval_step = jax.jit(step_lib.make_eval_step(setup.model, self.kind), in_shardings=(param_sh, setup.batch_sharding),
                                 out_shardings=out_sh)
        self.decode_step = None
        if self.kind == 'seq2seq' and cfg.eval.decode and exp.family.decoder is not None:
            fns = exp.family.decoder(exp.model_cfg, exp.spec)
            self.decode_step = jax.jit(step_lib.make_decode_step(fns, exp.spec.bos_id),
                                       in_shardings=(param_sh, setup.batch_sharding), out_shardings=out_sh)

    def __call__(self, params) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        scalars, curves = {}, {}
        for prefix, (task, batches) in self.sets.items():
            total = None
            for batch in batches:
                sums = self.eval_step(params, batch)
                if self.decode_step is not None:
                    sums = dict(sums, **self.decode_step(params, batch))
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            total = jax.device_get(total)
            scalars.update({f'{prefix}/{k}': v for k, v in summarize(total, self.kind).items()})
            if getattr(task, 'report_loss_by_position', False) and 'loss_by_position' in total:
                curve = total['loss_by_position'] / np.maximum(total['weight_by_position'], 1e-9)
                curves[prefix] = curve
                positions = [p for p in (2 ** np.arange(20)) - 1 if p < len(curve)] + [len(curve) - 1]
                scalars.update({f'{prefix}/loss_at_position/{p + 1:05d}': float(curve[p]) for p in positions})
        return scalars, curves


def _train_summary(pending: list[dict], kind: str) -> dict[str, float]:
    """Mean over the steps since the last log (one device->host transfer)."""
    stacked = jax.device_get(pending)
    mean = lambda k: float(np.mean([m[k] for m in stacked]))
    out = {'train/loss': mean('objective'), 'train/grad_norm': mean('grad_norm'),
           'train/learning_rate': float(stacked[-1]['learning_rate'])}
    if kind == 'regress':
        out['train/mse'] = sum(float(m['loss']) for m in stacked) / max(sum(float(m['weight']) for m in stacked), 1e-9)
    else:
        out['train/accuracy'] = (sum(float(m['correct']) for m in stacked)
                                 / max(sum(float(m['weight']) for m in stacked), 1e-9))
    return out


def train_and_evaluate(exp: Experiment, workdir: str, *, verbose: bool = True) -> dict[str, Any]:
    """Train (or continue training) `exp` in `workdir`; returns the last metrics logged."""
    cfg = exp.config
    cfg_dict = cfg.to_dict()
    chief = jax.process_index() == 0
    resume = checkpoint.check_workdir(workdir, cfg_dict)  # reads only
    setup = build(exp)
    evaluator = Evaluator(exp, setup)
    train_it = data.train_iterator(exp.task, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   threads=cfg.data.threads, prefetch=cfg.data.prefetch,
                                   process_index=jax.process_index(), process_count=jax.process_count())
    # Everything that can fail on a user's input has run: from here on files are written.
    if chief:
        checkpoint.write_config(workdir, cfg_dict)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=cfg.checkpoint.max_to_keep,
                                   async_save=cfg.checkpoint.async_save)
    progress = tracking.Progress(cfg.train.steps, 0, enabled=verbose and chief)
    start = ckpt.latest_step() if resume else None
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        if start is not None:
            state = ckpt.restore(start, setup.abstract_state, train_it)
            progress.message(f'resumed from step {start} in {workdir}')
        else:
            start = 0
            state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
        progress.start = start
        progress.message(parallel.describe_layout(setup.mesh, setup.rules_name, state.params, state.opt_state))
        for note in setup.notes:
            progress.message('  ' + note)
        writer = tracking.Writer(workdir) if chief else tracking.NullWriter()
        counts = accounting.summary(exp)
        if start == 0:
            writer.text(0, 'config', '```\n' + config_lib.to_json(cfg_dict) + '\n```')
        else:
            writer.restart_at(start + 1)
        writer.hparams({**config_lib.flatten(cfg_dict), **{f'accounting.{k}': v for k, v in counts.items()}})
        result = _loop(exp, setup, state, start, train_it, evaluator, ckpt, writer, progress, counts)
        ckpt.wait()
        ckpt.close()
        writer.close()
        progress.close()
    return result


def _loop(exp, setup, state, start, train_it, evaluator, ckpt, writer, progress, counts) -> dict[str, Any]:
    cfg = exp.config
    steps = cfg.train.steps
    kind = exp.spec.kind
    train_step = jax.jit(
        step_lib.make_train_step(setup.model, setup.tx, setup.lr, kind, label_smoothing=cfg.train.label_smoothing,
                                 seed=cfg.train.seed),
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, parallel.replicated(setup.mesh)), donate_argnums=(0,))
    result: dict[str, Any] = {'step': start}
    pending: list[dict] = []
    last_log_step, last_log_time = start, None
    examples_per_step = cfg.train.batch_size
    if start >= steps:
        progress.message(f'the run is already at step {start} >= train.steps={steps}; raise --config.train.steps '
                         f'to continue it')
    with _StopFlag() as stop:
        for step in range(start + 1, steps + 1):
            batch = data.to_global(next(train_it), setup.batch_sharding)
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            if last_log_time is None:  # time from the end of the first (compiling) step
                jax.block_until_ready(metrics)
                last_log_time, last_log_step = time.time(), step
            progress.update(step)
            is_last = step == steps
            if (step % cfg.train.log_every == 0 or is_last) and pending:
                scalars = _train_summary(pending, kind)
                pending.clear()
                elapsed = time.time() - last_log_time
                rate = (step - last_log_step) * examples_per_step / max(elapsed, 1e-9)
                scalars['train/tokens_per_sec'] = rate * exp.tokens_per_example()
                utilisation = accounting.mfu(counts['flops_per_example'], rate, setup.mesh.devices.size)
                if utilisation is not None:
                    scalars['train/mfu'] = utilisation
                last_log_step, last_log_time = step, time.time()
                writer.scalars(step, scalars)
                progress.log(step, {k: v for k, v in scalars.items() if k in ('train/loss', 'train/accuracy')})
                result.update(scalars, step=step)
            if step % cfg.eval.every_steps == 0 or is_last:
                scalars, curves = evaluator(state.params)
                writer.scalars(step, scalars)
                for prefix, curve in curves.items():
                    png, w, h = tracking.line_plot_png(curve, title=f'{exp.task.name}: {prefix} loss by position',
                                                       xlabel='position in context', ylabel='loss (nats)')
                    writer.image(step, f'{prefix}/loss_by_position', png, w, h)
                progress.message(f'step {step}: ' + ' '.join(f'{k} {v:.4g}' for k, v in scalars.items()
                                                             if '/loss_at_position/' not in k))
                result.update(scalars, step=step)
                writer.flush()
            if step % cfg.checkpoint.every_steps == 0 or is_last:
                ckpt.save(step, state, train_it, cfg.to_dict())
            if not is_last and stop.requested(step, cfg.train.log_every):
                if step % cfg.checkpoint.every_steps:
                    ckpt.save(step, state, train_it, cfg.to_dict())
                progress.message(f'stopped at step {step} by a signal; checkpoint saved, run the same command to '
                                 f'resume')
                result.update(status=INTERRUPTED, signal=stop.signal or signal.SIGTERM)
                return result
    result['status'] = 'done'
    return result
