"""The one training loop: every model family and task runs through `train_and_evaluate`.

Order of work: check the workdir and build everything that can fail (mesh, shardings,
data) before writing a byte; initialise shape-first (`eval_shape` -> logical specs ->
mesh shardings -> `jit(init, out_shardings)`), or restore the latest checkpoint; then
loop without waiting for the device except at logging, evaluation and saving steps; at
the end evaluate the test split once and write `results.json`. Whatever ends the loop
(the last step, a signal, an exception), pending checkpoints are finished and the event
file is closed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flaxformer_lite import accounting, data, parallel, tracking
from flaxformer_lite import config as config_lib
from flaxformer_lite.experiment import Experiment
from flaxformer_lite.train import checkpoint, evaluate, results as results_lib, step as step_lib
from flaxformer_lite.train.evaluate import Evaluator
from flaxformer_lite.train.setup import Setup, build  # noqa: F401  (build: also loop.build for callers)
from flaxformer_lite.train.state import TrainState

INTERRUPTED = 'interrupted'


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


@dataclasses.dataclass
class RunInfo:
    """How a run presents itself: its name (in results.json and as the HParams trial ID),
    the fields the HParams tab shows first, the metrics it declares there (None: the ones
    this run logs), and extra hyperparameter columns (a sweep adds its name)."""
    name: str
    first: tuple[str, ...] = tracking.KEY_FIELDS
    metrics: tuple[str, ...] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    trial_id: str | None = None  # the HParams row's ID (default: name); unique across sweeps


class StepTimer:
    """Seconds spent in training steps only. The loop pauses it around compilation (the
    first step of each start), evaluation, checkpointing and logging; pausing waits for
    the steps already dispatched, so their time is counted where it was spent."""

    def __init__(self):
        self.steps, self.seconds = 0, 0.0
        self._window_steps, self._window_seconds = 0, 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self, *pending: Any) -> None:
        if self._since is None:
            return
        jax.block_until_ready(pending)
        elapsed = time.perf_counter() - self._since
        self._since = None
        self.seconds += elapsed
        self._window_seconds += elapsed

    def count(self) -> None:
        """One training step dispatched (counted only while the timer runs)."""
        if self._since is not None:
            self.steps += 1
            self._window_steps += 1

    def window_rate(self) -> float | None:
        """Steps per second since the previous call (None if no timed step)."""
        rate = self._window_steps / self._window_seconds if self._window_steps and self._window_seconds > 0 else None
        self._window_steps, self._window_seconds = 0, 0.0
        return rate


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


class _Run:
    """The state of one start of a run besides the train state: what was measured so
    far (carried over restarts in the checkpoint's metadata) and where it is written."""

    def __init__(self, exp: Experiment, setup: Setup, evaluator: Evaluator, workdir: str, info: RunInfo,
                 progress: tracking.Progress, writer: tracking.Writer, meta: dict, started: float):
        self.exp, self.setup, self.evaluator, self.workdir, self.info = exp, setup, evaluator, workdir, info
        self.progress, self.writer = progress, writer
        self.best: dict[str, dict[str, float]] = dict(meta.get('best', {}))
        self.wall_before, self.train_before = float(meta.get('wall_s', 0.0)), float(meta.get('train_s', 0.0))
        self.timed_before = int(meta.get('timed_steps', 0))
        self.session_start = started  # this start of the run: wall time counts from here
        self.first_step_s: float | None = None  # start-up + compilation: what the compilation cache saves
        self.timer = StepTimer()
        self.last_eval: dict[str, float] = {}

    def meta(self) -> dict[str, Any]:
        return {'best': self.best, 'wall_s': self.wall_before + time.time() - self.session_start,
                'train_s': self.train_before + self.timer.seconds, 'timed_steps': self.timed_before + self.timer.steps}

    def evaluate(self, step: int, params: Any, split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        scalars, curves = self.evaluator(params, split)
        self.writer.scalars(step, scalars)
        for prefix, curve in curves.items():
            png, w, h = tracking.line_plot_png(curve, title=f'{self.exp.task.name}: {prefix} loss by position',
                                               xlabel='position in context', ylabel='loss (nats)')
            self.writer.image(step, f'{prefix}/loss_by_position', png, w, h)
        self.progress.message(f'step {step}: ' + ' '.join(f'{k} {v:.4g}' for k, v in scalars.items()
                                                         if '/loss_at_position/' not in k))
        self.writer.flush()
        plain = {k: float(v) for k, v in scalars.items() if '/loss_at_position/' not in k}
        if split == 'eval':
            self.last_eval = plain
            for name, value in plain.items():
                if name not in self.best or evaluate.is_better(name, value, self.best[name]['value']):
                    self.best[name] = {'value': value, 'step': step}
        return plain, curves

    def finish(self, step: int, params: Any) -> dict[str, Any]:
        """The test split, once, then `results.json` (process 0 writes it)."""
        test, curves = self.evaluate(step, params, 'test')
        meta = self.meta()
        record = results_lib.build(self.exp, name=self.info.name, workdir=self.workdir, step=step,
                                   metrics={**self.last_eval, **test}, best=self.best, curves=curves,
                                   wall_s=meta['wall_s'], train_s=meta['train_s'], timed_steps=meta['timed_steps'])
        record['first_step_s'] = self.first_step_s
        if jax.process_index() == 0:
            results_lib.write(self.workdir, record)
        return record


def default_info(workdir: str) -> RunInfo:
    return RunInfo(name=os.path.basename(os.path.normpath(os.path.abspath(workdir))))


def train_and_evaluate(exp: Experiment, workdir: str, *, verbose: bool = True,
                       info: RunInfo | None = None) -> dict[str, Any]:
    """Train (or continue training) `exp` in `workdir`, then evaluate the test split and
    write `results.json`. Returns the last metrics logged (and `status`)."""
    started = time.time()
    cfg = exp.config
    cfg_dict = cfg.to_dict()
    info = info or default_info(workdir)
    chief = jax.process_index() == 0
    resume = checkpoint.check_workdir(workdir, cfg_dict, exp.derived)  # reads only
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
    writer = tracking.Writer(workdir) if chief else tracking.NullWriter()
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            start = ckpt.latest_step() if resume else None
            meta = {}
            if start is not None:
                state, meta = ckpt.restore(start, setup.abstract_state, train_it)
                progress.message(f'resumed from step {start} in {workdir}')
            else:
                start = 0
                state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
            progress.start = start
            progress.message(parallel.describe_layout(setup.mesh, setup.rules_name, state.params, state.opt_state))
            for note in setup.notes:
                progress.message('  ' + note)
            counts = accounting.summary(exp)
            if start == 0:
                writer.text(0, 'config', '```\n' + config_lib.to_json(cfg_dict) + '\n```')
            else:
                writer.restart_at(start + 1)
            metrics = info.metrics if info.metrics is not None else evaluate.metric_names(exp)
            hparams = {**info.extra, **config_lib.flatten(cfg_dict), **{f'accounting.{k}': v for k, v in counts.items()}}
            writer.hparams(hparams, [*metrics, 'train/loss'], first=(*info.extra, *info.first),
                           trial_id=info.trial_id or info.name)
            run = _Run(exp, setup, evaluator, workdir, info, progress, writer, meta, started)
            return _loop(run, state, start, train_it, ckpt, counts)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        progress.close()


def _loop(run: _Run, state: TrainState, start: int, train_it, ckpt: checkpoint.Checkpointer,
          counts: dict[str, float]) -> dict[str, Any]:
    exp, setup, progress, writer, timer = run.exp, run.setup, run.progress, run.writer, run.timer
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
    tokens_per_step = cfg.train.batch_size * exp.tokens_per_example()
    if start >= steps:
        done = results_lib.read(run.workdir) if jax.process_index() == 0 else None
        if done is None or done.get('status') != 'done' or done.get('step') != start:
            # Stopped between the last checkpoint and results.json: evaluate and write them.
            run.evaluate(start, state.params, 'eval')
            done = run.finish(start, state.params)
        progress.message(f'the run is already at step {start} >= train.steps={steps}; raise --config.train.steps '
                         f'to continue it')
        return {**done.get('metrics', {}), 'status': 'done', 'step': start}

    def save(step: int) -> None:
        timer.stop(state)
        ckpt.save(step, state, train_it, cfg.to_dict(), run.meta())
        timer.start()

    with _StopFlag() as stop:
        for step in range(start + 1, steps + 1):
            batch = data.to_global(next(train_it), setup.batch_sharding)
            timer.count()
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            if step == start + 1:  # compiled in this step: time from its end
                jax.block_until_ready(metrics)
                run.first_step_s = time.time() - run.session_start
                timer.start()
            progress.update(step)
            is_last = step == steps
            if (step % cfg.train.log_every == 0 or is_last) and pending:
                timer.stop(metrics)
                scalars = _train_summary(pending, kind)
                pending.clear()
                rate = timer.window_rate()
                if rate is not None:
                    scalars['train/tokens_per_sec'] = rate * tokens_per_step
                    utilisation = accounting.mfu(counts['flops_per_example'], rate * cfg.train.batch_size,
                                                 setup.mesh.devices.size, cfg.model.dtype)
                    if utilisation is not None:
                        scalars['train/mfu'] = utilisation
                writer.scalars(step, scalars)
                progress.log(step, {k: v for k, v in scalars.items() if k in ('train/loss', 'train/accuracy')},
                             steps_per_s=rate)
                result.update(scalars, step=step)
                timer.start()
            if step % cfg.eval.every_steps == 0 or is_last:
                timer.stop(state)
                result.update(run.evaluate(step, state.params, 'eval')[0], step=step)
                timer.start()
            if step % cfg.checkpoint.every_steps == 0 or is_last:
                save(step)
            if is_last:  # the last checkpoint first: a stop from here on only redoes what follows
                timer.stop(state)
                ckpt.wait()
                result.update(run.finish(step, state.params)['metrics'])
            if not is_last and stop.requested(step, cfg.train.log_every):
                if step % cfg.checkpoint.every_steps:
                    save(step)
                progress.message(f'stopped at step {step} by a signal; checkpoint saved, run the same command to '
                                 f'resume')
                result.update(status=INTERRUPTED, signal=stop.signal or signal.SIGTERM)
                return result
    result['status'] = 'done'
    return result
