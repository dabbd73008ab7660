"""The one training loop: every model family and task runs through `train_and_evaluate`.

Order of work: check the workdir and build everything that can fail (mesh, shardings,
data) before writing a byte; take the workdir's lock (flaxformer_lite/runtime/lock.py; guards.py
has what every process decides alike: the lock, resuming, stopping, a NaN/Inf step);
initialise shape-first (`eval_shape` -> logical specs -> mesh shardings -> `jit(init,
out_shardings)`), or restore the latest good checkpoint (a damaged newest one is
reported and skipped); then loop without waiting for the device except at logging,
evaluation and saving steps; at the end evaluate the test split once and write
`results.json`. Whatever ends the loop (the last step, a signal, an exception), pending
checkpoints are finished, the event file is closed and the lock released.

Killed at any moment (kill -9 included), the same command resumes from the last complete
checkpoint and ends bit-identical to an uninterrupted run: every checkpoint holds the
data iterator and the metadata results.json sums; events are flushed before each
checkpoint, and each start writes a TensorBoard SessionLog START at the step it takes
over from, so the event history shows each step once. A NaN/Inf loss or gradient stops
the run (guards.NonFiniteError, exit status 3) before any bad state is saved, or is skipped
with `train.skip_nonfinite` (counted in `train/skipped_updates`); a full or read-only
disk ends it with StorageError (exit status 4), the checkpoints before it intact.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flaxformer_lite import accounting, data, sharding, tracking
from flaxformer_lite import config as config_lib
from flaxformer_lite.runtime import lock as lock_lib
from flaxformer_lite.errors import UserError
from flaxformer_lite.resolve import Run
from flaxformer_lite.train import checkpoint, evaluate, guards, results as results_lib, step as step_lib, transfer
from flaxformer_lite.train.evaluate import Evaluator
from flaxformer_lite.train.setup import Setup, build  # noqa: F401  (build: also loop.build for callers)
from flaxformer_lite.train.state import TrainState

INTERRUPTED = 'interrupted'


@dataclasses.dataclass
class RunInfo:
    """How a run presents itself: its name (in results.json and as the HParams trial ID),
    the fields the HParams tab shows first, the metrics it declares there (None: the ones
    this run logs), and extra hyperparameter columns (a sweep adds its name)."""
    name: str
    first: tuple[str, ...] = tracking.KEY_FIELDS
    metrics: tuple[str, ...] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    trial_id: str | None = None  # the HParams row's ID (default: name, or tracking.trial_id in a sweep)


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

    def __init__(self, exp: Run, setup: Setup, evaluator: Evaluator, workdir: str, info: RunInfo,
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
        self.skipped = int(meta.get('skipped_updates', 0))  # non-finite updates skipped so far
        self.train_logged: dict | None = meta.get('train_logged')  # the last train/* summary and its step
        self.init_from: dict | None = meta.get('init_from')  # where the first weights came from (train.init_from)
        # eval/* metric -> [[step, value], ...] of every evaluation (learning curves in the report)
        self.history: dict[str, list] = {k: list(v) for k, v in meta.get('history', {}).items()}

    def meta(self) -> dict[str, Any]:
        return {'best': self.best, 'wall_s': self.wall_before + time.time() - self.session_start,
                'train_s': self.train_before + self.timer.seconds, 'timed_steps': self.timed_before + self.timer.steps,
                'skipped_updates': self.skipped, 'train_logged': self.train_logged, 'init_from': self.init_from,
                'history': self.history}

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
                self.history.setdefault(name, []).append([step, value])
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
                                   wall_s=meta['wall_s'], train_s=meta['train_s'], timed_steps=meta['timed_steps'],
                                   skipped_updates=self.skipped)
        record['first_step_s'] = self.first_step_s
        record['init_from'] = self.init_from
        record['history'] = self.history
        if jax.process_index() == 0:
            path = results_lib.write(self.workdir, record)
            self.progress.message(f'step {step}: wrote {path}')
        return record


def _already_done(workdir: str, cfg) -> dict[str, Any] | None:
    """The results of a finished run whose last checkpoint is where results.json says
    (nothing to do, nothing to write), or None."""
    done = results_lib.read(workdir)
    steps = checkpoint.steps_saved(workdir)
    if (done and done['status'] == 'done' and steps and done['step'] == steps[0]
            and steps[0] >= cfg.train.steps):
        return done
    return None


def _warn(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def default_info(workdir: str) -> RunInfo:
    return RunInfo(name=os.path.basename(os.path.normpath(os.path.abspath(workdir))))


def next_steps(exp: Run, workdir: str) -> str:
    """The closing lines of a finished run: where to look at it and what to run next."""
    parent = os.path.dirname(os.path.normpath(workdir)) or '.'
    where = shlex.quote(workdir)
    lines = [f'next: tensorboard --logdir {shlex.quote(parent)}',
             f'      python launch.py --eval_only --workdir={where}']
    if exp.spec.kind in ('lm', 'seq2seq') and exp.family.decoder is not None:
        lines.append(f"      python launch.py --generate --workdir={where} --prompt=TEXT")
    return '\n'.join(lines)


def train_and_evaluate(exp: Run, workdir: str, *, verbose: bool = True,
                       info: RunInfo | None = None) -> dict[str, Any]:
    """Train (or continue training) `exp` in `workdir`, then evaluate the test split and
    write `results.json`. Returns the last metrics logged (and `status`).

    Raises UserError before writing anything for what a user can fix (the workdir holds
    another run, is in use by another process, has only damaged checkpoints, ...),
    NonFiniteError when the loss or gradients go NaN/Inf, StorageError when the disk
    refuses a write."""
    started = time.time()
    cfg = exp.config
    cfg_dict = cfg.to_dict()
    info = info or default_info(workdir)
    if jax.process_count() == 1:
        lock_lib.check_free(workdir)  # at once, before building anything
    resume = checkpoint.check_workdir(workdir, cfg_dict, exp.derived)  # reads only
    done = _already_done(workdir, cfg) if resume else None
    if done is not None:
        if verbose and jax.process_index() == 0:
            print(f'the run in {workdir} is done at step {done["step"]} >= train.steps={cfg.train.steps}; raise '
                  f'--config.train.steps to continue it', file=sys.stderr, flush=True)
        return {**done.get('metrics', {}), 'status': 'done', 'step': done['step']}
    setup = build(exp)
    # train.init_from matters only for a first start (a started run has its weights in its checkpoints).
    started_before = resume and checkpoint.steps_saved(workdir)
    init_plan = None if started_before else transfer.plan(cfg, setup.abstract_state.params, exp.model_cfg)
    evaluator = Evaluator(exp, setup)
    train_it = data.train_iterator(exp.task, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   threads=cfg.data.threads, prefetch=cfg.data.prefetch,
                                   process_index=jax.process_index(), process_count=jax.process_count())
    # Everything that can fail on a user's input has run. Take the workdir, look again
    # (another process may have written it meanwhile), and from here on write files.
    held = guards.take_lock(workdir)
    try:
        resume = guards.agreed(checkpoint.check_workdir(workdir, cfg_dict, exp.derived))
        restored = _restore(exp, setup, train_it, workdir) if resume else None
    except BaseException:
        held.release(undo=True)
        raise
    try:
        return _train(exp, setup, evaluator, train_it, workdir, info, restored, held, verbose, started, init_plan)
    except Exception as e:
        reason = checkpoint.storage_failure(e)
        if reason is None:
            raise
        steps = checkpoint.steps_saved(workdir)
        kept = f'the checkpoints up to step {steps[0]} are intact' if steps else 'no checkpoint was written yet'
        raise checkpoint.StorageError(
            f'--workdir={workdir}: its disk refused a write ({reason}); {kept}: free space or make it writable, '
            f'then run the same command again to resume') from None
    finally:
        held.release()


def _restore(exp: Run, setup: Setup, train_it, workdir: str):
    """(step, state, meta, damaged steps) of the newest good checkpoint, or None for a run
    that never completed one; read-only, so a refusal here leaves the workdir as it was."""
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=exp.config.checkpoint.max_to_keep, async_save=False,
                                   read_only=True)
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            restored = ckpt.restore_latest(setup.abstract_state, train_it, warn=_warn)
    finally:
        ckpt.close()
    if restored is None and results_lib.read(workdir) is not None:
        raise UserError(f'--workdir={workdir} holds a finished run (results.json) but no checkpoint; restore '
                        f'{checkpoint.CHECKPOINT_DIR}/ from a backup, or delete --workdir to start the run again')
    return restored


def _train(exp: Run, setup: Setup, evaluator: Evaluator, train_it, workdir: str, info: RunInfo,
           restored, held, verbose: bool, started: float, init_plan: transfer.Plan | None) -> dict[str, Any]:
    cfg = exp.config
    cfg_dict = cfg.to_dict()
    chief = jax.process_index() == 0
    earlier_events = os.path.isdir(workdir) and any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
    if chief:
        checkpoint.write_config(workdir, cfg_dict)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=cfg.checkpoint.max_to_keep,
                                   async_save=cfg.checkpoint.async_save)
    progress = tracking.Progress(cfg.train.steps, 0, enabled=verbose and chief)
    writer = tracking.Writer(workdir) if chief else tracking.NullWriter()
    failed = True
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            meta: dict = {}
            if restored is not None:
                start, state, meta, damaged = restored
                ckpt.set_aside(damaged)
                progress.message(f'resumed from step {start} in {workdir}')
            else:
                start = 0
                state = setup.init_state()
                if init_plan is not None:  # a resumed run has them in its checkpoint
                    state = state.replace(params=transfer.load(init_plan, state.params))
                    meta['init_from'] = init_plan.summary()
                    for line in init_plan.lines():
                        progress.message(line)
            progress.start = start
            progress.message(sharding.describe_layout(setup.mesh, setup.rules_name, state.params, state.opt_state))
            for note in setup.notes:
                progress.message('  ' + note)
            counts = accounting.summary(exp)
            # TensorBoard: a SessionLog START at the step this start takes over from makes its
            # reader drop what earlier starts wrote there and later (work this start redoes).
            # The first START of a run only marks its beginning, so after earlier starts
            # (possibly written before these markers existed) write it twice.
            marker = 0 if start == 0 else start if start >= cfg.train.steps else start + 1
            for _ in range(2 if earlier_events else 1):
                writer.restart_at(marker)
            if start == 0:
                writer.text(0, 'config', '```\n' + config_lib.to_json(cfg_dict) + '\n```')
                metrics = info.metrics if info.metrics is not None else evaluate.metric_names(exp)
                # Every run declares `sweep` (single runs too), so no run lacks a column.
                hparams = {'sweep': tracking.NO_SWEEP, **info.extra, **config_lib.flatten(cfg_dict),
                           **{f'accounting.{k}': v for k, v in counts.items()}}
                sweep = info.extra.get('sweep')
                trial_id = info.trial_id or (tracking.trial_id(sweep, hparams, info.first) if sweep else info.name)
                writer.hparams(hparams, [*metrics, 'train/loss'], first=info.first, trial_id=trial_id)
            run = _Run(exp, setup, evaluator, workdir, info, progress, writer, meta, started)
            result = _loop(run, state, start, train_it, ckpt, counts, held)
        failed = False
        if result.get('status') == 'done':
            progress.message(next_steps(exp, workdir))
        return result
    finally:
        for close in (ckpt.wait, ckpt.close, writer.close, progress.close):
            try:
                close()
            except Exception:  # noqa: BLE001 -- after a failure, cleanup must not hide it
                if not failed:
                    raise


def _loop(run: _Run, state: TrainState, start: int, train_it, ckpt: checkpoint.Checkpointer,
          counts: dict[str, float], held) -> dict[str, Any]:
    exp, setup, progress, writer, timer = run.exp, run.setup, run.progress, run.writer, run.timer
    cfg = exp.config
    steps = cfg.train.steps
    kind = exp.spec.kind
    replicated = sharding.replicated(setup.mesh)
    train_step = jax.jit(
        step_lib.make_train_step(setup.model, setup.tx, setup.lr, kind, label_smoothing=cfg.train.label_smoothing,
                                 seed=cfg.train.seed, skip_nonfinite=cfg.train.skip_nonfinite),
        in_shardings=(setup.state_shardings, setup.batch_sharding, replicated, replicated),
        out_shardings=(setup.state_shardings, replicated, replicated), donate_argnums=(0,))
    hparams = jax.device_put(setup.step_inputs(), replicated)  # inputs, not constants: one program per shape
    health = jax.jit(lambda: step_lib.initial_health(run.skipped), out_shardings=replicated)()
    result: dict[str, Any] = {'step': start}
    pending: list[tuple[int, dict]] = []
    tokens_per_step = cfg.train.batch_size * exp.tokens_per_example()
    if start >= steps:
        # Stopped between the last checkpoint and results.json (or results.json deleted):
        # what was logged at this step is logged again (the START marker at `start` dropped
        # it), the test split evaluated, results.json written.
        logged = run.train_logged
        if logged and logged.get('step') == start:
            writer.scalars(start, logged['scalars'])
        run.evaluate(start, state.params, 'eval')
        done = run.finish(start, state.params)
        progress.message(f'the run is already at step {start} >= train.steps={steps}; raise --config.train.steps '
                         f'to continue it')
        return {**done.get('metrics', {}), 'status': 'done', 'step': start}

    def save(step: int) -> None:
        timer.stop(state)
        run.skipped = guards.check_health(jax.device_get(health), ckpt)  # a bad state never becomes a checkpoint
        if held.lost is not None:
            raise UserError(f'--workdir={run.workdir}: its lock was taken over by {lock_lib.describe(held.lost)} '
                            f'(this process looked dead to it); stopping without saving so that two runs do not mix')
        writer.flush()  # everything logged up to this checkpoint is on disk before it is
        ckpt.save(step, state, train_it, cfg.to_dict(), run.meta())
        timer.start()

    with guards.StopFlag() as stop:
        for step in range(start + 1, steps + 1):
            batch = data.to_global(next(train_it), setup.batch_sharding)
            timer.count()
            state, metrics, health = train_step(state, batch, hparams, health)
            pending.append((step, metrics))
            if step == start + 1:  # compiled in this step: time from its end
                jax.block_until_ready(metrics)
                run.first_step_s = time.time() - run.session_start
                timer.start()
            progress.update(step)
            is_last = step == steps
            if (step % cfg.train.log_every == 0 or is_last) and pending:
                timer.stop(metrics)
                fetched, now = jax.device_get(([m for _, m in pending], health))
                run.skipped = guards.check_health(now, ckpt, [(s, m) for (s, _), m in zip(pending, fetched)])
                scalars = _train_summary(fetched, kind)
                if cfg.train.skip_nonfinite:
                    scalars['train/skipped_updates'] = float(run.skipped)
                pending.clear()
                rate = timer.window_rate()
                if rate is not None:
                    scalars['train/tokens_per_sec'] = rate * tokens_per_step
                    utilisation = accounting.mfu(counts['flops_per_example'], rate * cfg.train.batch_size,
                                                 setup.mesh.devices.size, cfg.model.dtype)
                    if utilisation is not None:
                        scalars['train/mfu'] = utilisation
                writer.scalars(step, scalars)
                run.train_logged = {'step': step, 'scalars': scalars}
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
