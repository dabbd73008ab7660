"""The one training loop: every model family and task runs through `train_and_evaluate`.

Order of work: check the workdir and build everything that can fail (mesh, shardings,
data) before writing a byte; take the workdir (the shell's hooks, train/hooks.py, hold its
lock; guards.py has what every process decides alike: resuming, a NaN/Inf step);
initialise shape-first (`eval_shape` -> logical specs -> mesh shardings -> `jit(init,
out_shardings)`), or restore the latest good checkpoint (a damaged newest one is
reported and skipped); then loop without waiting for the device except at logging,
evaluation and saving steps; at the end evaluate the test split once and write
`results.json`. Whatever ends the loop (the last step, a stop request, an exception),
pending checkpoints are finished, the event file is closed and the workdir released.

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

import contextlib
import signal
import sys
import time
from typing import Any, Iterator

import flax.linen as nn
import jax

from flaxformer_lite import accounting, data, sharding, tracking
from flaxformer_lite.errors import UserError
from flaxformer_lite.resolve import Run
from flaxformer_lite.train import checkpoint, guards, results as results_lib, step as step_lib, transfer
from flaxformer_lite.train.evaluate import Evaluator
from flaxformer_lite.train.hooks import Held, RunHooks
from flaxformer_lite.train.bookkeeping import (Measured, Outputs, RunInfo, StepTimer, default_info, log_start,
                                               next_steps, train_summary)
from flaxformer_lite.train.setup import Setup, build, jit_train_step  # build: also loop.build, for callers

INTERRUPTED = 'interrupted'
__all__ = ['INTERRUPTED', 'RunInfo', 'StepTimer', 'build', 'default_info', 'next_steps', 'train_and_evaluate']


def train_and_evaluate(exp: Run, workdir: str, *, verbose: bool = True, info: RunInfo | None = None,
                       hooks: RunHooks | None = None) -> dict[str, Any]:
    """Train (or continue training) `exp` in `workdir`, then evaluate the test split and
    write `results.json`. Returns the last metrics logged (and `status`). `hooks`: what
    the shell adds (the workdir's lock, stop signals); by default none of it.

    Raises UserError before writing anything for what a user can fix (the workdir holds
    another run, is in use by another process, has only damaged checkpoints, ...),
    NonFiniteError when the loss or gradients go NaN/Inf, StorageError when the disk
    refuses a write."""
    started = time.time()
    cfg, kind, steps = exp.config, exp.spec.kind, exp.config.train.steps
    info, hooks = info or default_info(workdir), hooks or RunHooks()

    # Check, reading only: at once, before building anything.
    hooks.check_free(workdir)
    resume = checkpoint.check_workdir(workdir, cfg.to_dict(), exp.derived)
    done = _finished(workdir, steps) if resume else None
    if done is not None:
        if verbose and jax.process_index() == 0:
            print(f'the run in {workdir} is done at step {done["step"]} >= train.steps={steps}; raise '
                  f'--config.train.steps to continue it', file=sys.stderr, flush=True)
        return {**done.get('metrics', {}), 'status': 'done', 'step': done['step']}

    # Build everything that can fail on a user's input, still writing nothing.
    setup = build(exp)
    # train.init_from matters only for a first start (a started run has its weights in its checkpoints).
    started_before = resume and checkpoint.steps_saved(workdir)
    init_plan = None if started_before else transfer.plan(cfg, setup.abstract_state.params, exp.model_cfg)
    evaluator = Evaluator(exp, setup)
    train_it = data.train_iterator(exp.task, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   threads=cfg.data.threads, prefetch=cfg.data.prefetch,
                                   process_index=jax.process_index(), process_count=jax.process_count())

    # Take the workdir, look again (another process may have written it meanwhile) and
    # read its newest good checkpoint; a refusal up to here leaves the workdir as it was.
    held = hooks.claim(workdir)
    try:
        resume = guards.agreed(checkpoint.check_workdir(workdir, cfg.to_dict(), exp.derived))
        restored = _restore(exp, setup, train_it, workdir) if resume else None
    except BaseException:
        held.release(undo=True)
        raise

    # From here on files are written.
    with (_releasing(held), _storage_errors(workdir), Outputs(workdir, cfg, verbose=verbose) as out,
          jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules)):
        ckpt, progress, writer = out.ckpt, out.progress, out.writer
        # Restore or initialise.
        if restored is not None:
            start, state, meta, damaged = restored
            ckpt.set_aside(damaged)
            progress.message(f'resumed from step {start} in {workdir}')
        else:
            start, state, meta = 0, setup.init_state(), {}
            if init_plan is not None:  # a resumed run has them in its checkpoint
                state = state.replace(params=transfer.load(init_plan, state.params))
                meta['init_from'] = init_plan.summary()
                for line in init_plan.lines():
                    progress.message(line)
        progress.start = start
        counts = accounting.summary(exp)
        log_start(exp, setup, state, out=out, start=start, info=info, counts=counts)
        run = Measured.of(meta)

        timer = StepTimer()
        replicated = sharding.replicated(setup.mesh)
        train_step = jit_train_step(setup, cfg, kind)
        hparams = jax.device_put(setup.step_inputs(), replicated)  # inputs, not constants: one program per shape
        health = jax.jit(lambda: step_lib.initial_health(run.skipped), out_shardings=replicated)()
        tokens_per_step = cfg.train.batch_size * exp.tokens_per_example()
        result: dict[str, Any] = {'step': start}
        pending: list[tuple[int, dict]] = []  # (step, metrics) not yet fetched from the device

        def log(step: int) -> None:
            """The train/* means since the last log, throughput and MFU (one transfer)."""
            with timer.paused(pending[-1][1]):
                fetched, now = jax.device_get(([m for _, m in pending], health))
                run.skipped = guards.check_health(now, ckpt, [(s, m) for (s, _), m in zip(pending, fetched)])
                scalars = train_summary(fetched, kind)
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

        def evaluate(step: int, split: str) -> tuple[dict[str, float], dict]:
            """One split, logged (eval: also the history and the best values)."""
            with timer.paused(state):
                scalars, curves = evaluator(state.params, split)
                out.log_evaluation(step, scalars, curves, task=exp.task.name)
                plain = {k: float(v) for k, v in scalars.items() if '/loss_at_position/' not in k}
                if split == 'eval':
                    run.evaluated(step, plain)
                    result.update(plain, step=step)
                return plain, curves

        def save(step: int) -> None:
            """A checkpoint of `state`, found healthy (a bad state never becomes one)."""
            with timer.paused(state):
                run.skipped = guards.check_health(jax.device_get(health), ckpt)
                if held.lost is not None:
                    raise UserError(f'--workdir={workdir}: its lock was taken over by {held.lost} (this process looked '
                                    f'dead to it); stopping without saving so that two runs do not mix')
                writer.flush()  # everything logged up to this checkpoint is on disk before it is
                ckpt.save(step, state, train_it, cfg.to_dict(), run.meta(timer, started))

        def finish(step: int) -> None:
            """The test split, once, then `results.json` (process 0 writes it)."""
            with timer.paused(state):
                ckpt.wait()  # the last checkpoint first: a stop from here on only redoes what follows
                test, curves = evaluate(step, 'test')
                meta = run.meta(timer, started)
                record = results_lib.build(exp, name=info.name, workdir=workdir, step=step,
                                           metrics={**run.last_eval, **test}, best=run.best, curves=curves,
                                           wall_s=meta['wall_s'], train_s=meta['train_s'],
                                           timed_steps=meta['timed_steps'], skipped_updates=run.skipped)
                record.update(first_step_s=run.first_step_s, init_from=run.init_from, history=run.history)
                if jax.process_index() == 0:
                    path = results_lib.write(workdir, record)
                    progress.message(f'step {step}: wrote {path}')
                result.update(record['metrics'], status='done')

        with hooks.stop_requests() as stop:
            for step in range(start + 1, steps + 1):
                batch = data.to_global(next(train_it), setup.batch_sharding)
                timer.count()
                state, metrics, health = train_step(state, batch, hparams, health)
                pending.append((step, metrics))
                if step == start + 1:  # compiled in this step: time from its end
                    jax.block_until_ready(metrics)
                    run.first_step_s = time.time() - started
                    timer.start()
                progress.update(step)
                if step % cfg.train.log_every == 0 or step == steps:
                    log(step)
                if step % cfg.eval.every_steps == 0 or step == steps:
                    evaluate(step, 'eval')
                if step % cfg.checkpoint.every_steps == 0 or step == steps:
                    save(step)
                if step < steps and stop.requested(step, cfg.train.log_every):
                    if step % cfg.checkpoint.every_steps:
                        save(step)
                    progress.message(f'stopped at step {step} by a signal; checkpoint saved, run the same command '
                                     f'to resume')
                    return {**result, 'status': INTERRUPTED, 'signal': stop.signal or signal.SIGTERM}
            if start >= steps:
                # Stopped between the last checkpoint and results.json (or results.json
                # deleted): the START marker at `start` dropped what was logged there, so
                # it is logged again before the test split and results.json.
                progress.message(f'the run is already at step {start} >= train.steps={steps}; raise '
                                 f'--config.train.steps to continue it')
                if run.train_logged and run.train_logged.get('step') == start:
                    writer.scalars(start, run.train_logged['scalars'])
                evaluate(start, 'eval')
            finish(max(start, steps))
        progress.message(next_steps(exp, workdir))
        return result


def _finished(workdir: str, steps: int) -> dict[str, Any] | None:
    """The results of a finished run whose last checkpoint is where results.json says
    (nothing to do, nothing to write), or None."""
    done = results_lib.read(workdir)
    saved = checkpoint.steps_saved(workdir)
    if done and done['status'] == 'done' and saved and done['step'] == saved[0] and saved[0] >= steps:
        return done
    return None


def _warn(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


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


@contextlib.contextmanager
def _releasing(held: Held) -> Iterator[None]:
    """The workdir is let go of whatever ends the run."""
    try:
        yield
    finally:
        held.release()


@contextlib.contextmanager
def _storage_errors(workdir: str) -> Iterator[None]:
    """A write the disk refused (full, read-only, ...) as one StorageError line."""
    try:
        yield
    except Exception as e:
        reason = checkpoint.storage_failure(e)
        if reason is None:
            raise
        steps = checkpoint.steps_saved(workdir)
        kept = f'the checkpoints up to step {steps[0]} are intact' if steps else 'no checkpoint was written yet'
        raise checkpoint.StorageError(
            f'--workdir={workdir}: its disk refused a write ({reason}); {kept}: free space or make it writable, '
            f'then run the same command again to resume') from None
