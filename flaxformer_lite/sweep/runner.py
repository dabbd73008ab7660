"""Running a sweep's trials: one trial in this process (`--trial=I`, what every scheduler
calls), or all unfinished ones here, N at a time in separate processes (`--parallel=N`).

Trial workdirs hold only what a run writes. The sweep's own bookkeeping sits beside
them in `logs/`: `<dir>.log` (the trial's output) and `<dir>.json` (running / failed
with exit code and last error line / done). A rerun skips trials whose results.json
says done, resumes unfinished ones from their checkpoints and reruns failed ones; a
failure never stops the others. All trials share one persistent JAX compilation cache
(`jax_cache/`), so a shape compiled by one trial is read, not compiled, by the next
(trials that differ only in their seed are never started side by side while others
wait, so the second reads what the first compiled). Trials are forked from a server
that has imported jax and this package once (`forkserver.py`; plain subprocesses when
it cannot run, or with FLAXFORMER_FORK_SERVER=0).

Safe to kill at any moment: the runner holds the sweep workdir's lock (a second runner
is refused), each trial process holds its trial workdir's lock (a second `--trial=I`, or
a SLURM array task given the same trial, is refused before it writes anything, status
file included) and gets SIGTERM when the runner dies (kill -9 included), so it saves a
checkpoint and exits. A rerun waits for trials still held by a live process and
resumes the others; each trial finishes exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

from flaxformer_lite.errors import UserError
from flaxformer_lite.runtime import exits
from flaxformer_lite.runtime.forkserver import ForkServer, Forked
from flaxformer_lite.sweep.plan import CACHE_DIR, LOG_DIR, Sweep, TrialSpec
from flaxformer_lite.util import format_duration

# The metric shown for each trial in progress lines and the final table (first present).
SHOWN_METRICS = ('test/accuracy', 'test/exact_match', 'test/mse', 'test/loss')


def status_path(sweep: Sweep, trial: TrialSpec) -> str:
    return os.path.join(sweep.workdir, LOG_DIR, trial.dir + '.json')


def log_path(sweep: Sweep, trial: TrialSpec) -> str:
    return os.path.join(sweep.workdir, LOG_DIR, trial.dir + '.log')


def write_status(sweep: Sweep, trial: TrialSpec, **fields: Any) -> None:
    path = status_path(sweep, trial)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {'index': trial.index, 'name': trial.name, 'host': socket.gethostname(), 'pid': os.getpid(),
              'time': time.strftime('%Y-%m-%dT%H:%M:%S'), **fields}
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=2)
    os.replace(path + '.tmp', path)


def read_status(sweep: Sweep, trial: TrialSpec) -> dict[str, Any]:
    """{'status': done | failed | running | pending, ...}: results.json first, then logs/."""
    results = os.path.join(sweep.trial_workdir(trial), 'results.json')
    if os.path.isfile(results):
        try:
            with open(results) as f:
                record = json.load(f)
            if record.get('status') == 'done':
                return record
        except (OSError, ValueError):
            pass
    try:
        with open(status_path(sweep, trial)) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return {'status': 'pending'}
    # Only results.json makes a trial done (it may have been deleted to rerun the trial).
    return {'status': 'pending'} if status.get('status') == 'done' else status


def use_compilation_cache(sweep: Sweep) -> None:
    """Every trial reads and writes one persistent cache under the sweep workdir (also
    tiny CPU programs: the threshold is lowered from jax's default of one second)."""
    import jax
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.join(sweep.root, CACHE_DIR)))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def sweep_metrics(sweep: Sweep) -> tuple[str, ...]:
    """The metrics every trial logs (declared in the HParams tab: no empty cells)."""
    from flaxformer_lite import resolve
    from flaxformer_lite.train import evaluate
    common: list[str] | None = None
    for trial in sweep.trials:
        try:
            names = evaluate.metric_names(resolve.from_config(sweep.trial_config(trial)))
        except UserError:
            continue  # a trial that cannot run adds no column
        common = names if common is None else [n for n in common if n in names]
    return tuple(common or ())


def run_trial(sweep: Sweep, index: int, *, verbose: bool = True) -> int:
    """Run trial `index` in this process; returns the exit status (0 done, 2 user error).
    The trial's workdir lock is taken first: a trial another process runs is refused
    (UserError) before this process writes anything."""
    from flaxformer_lite.runtime import lock as lock_lib
    if not 0 <= index < len(sweep.trials):
        raise UserError(f'--trial={index} is out of range: the sweep has trials 0..{len(sweep.trials) - 1}')
    trial = sweep.trials[index]
    if read_status(sweep, trial).get('status') == 'done':
        print(f'trial {index} ({trial.name}) is done; nothing to do', file=sys.stderr)
        return 0
    held = lock_lib.acquire(sweep.trial_workdir(trial), flag=f'--trial={index}: its workdir')
    undo = False
    try:
        if read_status(sweep, trial).get('status') == 'done':  # finished by another process meanwhile
            undo = True
            print(f'trial {index} ({trial.name}) is done; nothing to do', file=sys.stderr)
            return 0
        from flaxformer_lite import resolve  # jax: after the lock, so a refusal is quick
        from flaxformer_lite.train import loop
        use_compilation_cache(sweep)
        write_status(sweep, trial, status='running')
        started = time.time()
        try:
            exp = resolve.from_config(sweep.trial_config(trial))
            info = loop.RunInfo(name=trial.name, first=tuple(sweep.swept_fields), metrics=sweep_metrics(sweep),
                                extra={'sweep': sweep.name})
            from flaxformer_lite.runtime.hooks import shell_hooks
            result = loop.train_and_evaluate(exp, sweep.trial_workdir(trial), verbose=verbose, info=info,
                                             hooks=shell_hooks())
        except UserError as e:
            undo = True
            write_status(sweep, trial, status='failed', exit_code=2, error=str(e), wall_s=time.time() - started)
            raise
        except BaseException as e:  # a bug or a kill: recorded, then re-raised (with its traceback if a bug)
            status = exits.status_of(e) or exits.BUG
            line = str(e) if status != exits.BUG else traceback.format_exception_only(type(e), e)[-1].strip()
            write_status(sweep, trial, status='failed', exit_code=status, error=line, wall_s=time.time() - started)
            raise
        code = exits.of_result(result)
        write_status(sweep, trial, status='interrupted' if code else 'done', wall_s=time.time() - started)
        return code
    finally:
        held.release(undo=undo)


# The one entry point of a trial (sweep/trial.py), as a module and as the fork server's call.
TRIAL_MODULE = 'flaxformer_lite.sweep.trial'
TRIAL_CALL = f'{TRIAL_MODULE}:main'
# What the fork server imports once for every trial (the rest of a trial's imports are small).
PRELOAD = ('flax.linen', 'grain', 'optax', 'orbax.checkpoint', 'tensorboard.summary.writer.event_file_writer',
           TRIAL_MODULE, 'flaxformer_lite.resolve', 'flaxformer_lite.train.loop')


def trial_argv(sweep: Sweep, trial_index: int | str) -> list[str]:
    """The arguments of the trial entry point that run one trial: the sweep's workdir and
    the trial's index (its config is what the sweep recorded there)."""
    stage = [f'--stage={sweep.stage}'] if sweep.stage != 'main' else []
    return [f'--workdir={os.path.abspath(sweep.root)}', f'--trial={trial_index}', *stage]


def trial_command(sweep: Sweep, trial_index: int | str) -> list[str]:
    """The command that runs one trial (the same for the local runner and SLURM)."""
    return [sys.executable, '-m', TRIAL_MODULE, *trial_argv(sweep, trial_index)]


def child_env() -> dict[str, str]:
    """The environment of trial processes: this package importable wherever they start."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
    return env


def _core_groups(n: int) -> list[set[int]]:
    """The CPUs split into n groups, one per concurrent trial (XLA sizes its thread
    pool by the CPUs a process may use, so two trials do not fight over all cores)."""
    cores = sorted(os.sched_getaffinity(0))
    if n >= len(cores):
        return [{cores[i % len(cores)]} for i in range(n)]
    size = len(cores) // n
    return [set(cores[i * size:(i + 1) * size]) for i in range(n)]


def _shown(record: dict[str, Any]) -> str:
    metrics = record.get('metrics') or {}
    name = next((m for m in SHOWN_METRICS if m in metrics), None)
    return f'{name} {metrics[name]:.4g}' if name else record.get('error', '')[:100]


# Fields that enter the compiled programs as data, not constants: the seed, and the train
# step's hyperparameter inputs (train/optimizer.py STEP_INPUTS; a test checks they agree).
DATA_FIELDS = ('train.seed', 'optim.learning_rate')


def _shapes(trial: TrialSpec) -> tuple:
    """What a trial compiles is fixed by everything but DATA_FIELDS, so trials alike but
    for them (seeds, a learning-rate grid) share the compilation cache."""
    return tuple(sorted((k, repr(v)) for k, v in trial.overrides.items() if k not in DATA_FIELDS))


def _next_trial(ready: list[TrialSpec], running: list[TrialSpec]) -> TrialSpec | None:
    """The first ready trial whose programs no running trial is compiling: started beside
    its twin, it would compile the same programs again instead of reading them from the
    cache once the twin has written them (a second seed then costs a fraction of the first)."""
    busy = {_shapes(t) for t in running}
    return next((t for t in ready if _shapes(t) not in busy), ready[0] if ready else None)


def run_local(sweep: Sweep, parallel: int) -> int:
    """Run every unfinished trial, `parallel` at a time; print progress and a final
    table; 1 if any trial failed (0 otherwise, 128+signal when stopped by one). The
    caller holds the sweep workdir's lock."""
    from flaxformer_lite.runtime.supervisor import die_with_parent
    from flaxformer_lite.runtime import lock as lock_lib
    todo = [t for t in sweep.trials if read_status(sweep, t).get('status') != 'done']
    total = len(sweep.trials)
    print(f'sweep {sweep.name}: {total} trials, {total - len(todo)} done, {len(todo)} to run, {parallel} at a time',
          file=sys.stderr, flush=True)
    groups = _core_groups(parallel)
    free = list(range(parallel))
    running: dict[int, tuple[subprocess.Popen | Forked, TrialSpec, float]] = {}
    failed, finished, durations = [], total - len(todo), []
    stop = {'signal': None}

    def handle(signum, frame):
        del frame
        stop['signal'] = signum
        for proc, *_ in running.values():
            proc.send_signal(signal.SIGTERM)  # each trial saves a checkpoint and exits

    def preexec(cores):
        def run():
            os.sched_setaffinity(0, cores)
            die_with_parent(signal.SIGTERM)()  # a killed runner's trials save and stop
        return run

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    waiting: set[int] = set()
    server = ForkServer.start(child_env(), preload=PRELOAD) if todo else None
    try:
        queue = list(todo)
        # After a stop the queue is left as it is: once the running trials have saved and
        # exited, the runner returns (the rest stay pending for the next run).
        while running or (queue and stop['signal'] is None):
            while queue and free and stop['signal'] is None:
                # A trial another live process holds (a trial of a killed runner still
                # saving, a --trial task) waits; the others go first.
                trial = _next_trial([t for t in queue if lock_lib.holder(sweep.trial_workdir(t)) is None],
                                    [t for _, t, *_ in running.values()])
                if trial is None:
                    for t in queue:
                        holder = lock_lib.holder(sweep.trial_workdir(t))
                        if holder is not None and t.index not in waiting:
                            waiting.add(t.index)
                            print(f'trial {t.index} ({t.name}) is in use by {lock_lib.describe(holder)}; waiting for '
                                  f'it', file=sys.stderr, flush=True)
                    break
                queue.remove(trial)
                if read_status(sweep, trial).get('status') == 'done':  # finished by that other process
                    finished += 1
                    continue
                slot = free.pop(0)
                os.makedirs(os.path.join(sweep.workdir, LOG_DIR), exist_ok=True)
                proc = server and server.spawn(TRIAL_CALL, trial_argv(sweep, trial.index), log_path(sweep, trial),
                                               groups[slot])
                if proc is None:  # no fork server: a plain subprocess, its output appended to the log
                    with open(log_path(sweep, trial), 'a') as log:  # the child keeps its own copy of the file
                        proc = subprocess.Popen(trial_command(sweep, trial.index), stdout=log, stderr=subprocess.STDOUT,
                                                env=child_env(), preexec_fn=preexec(groups[slot]))
                running[slot] = (proc, trial, time.time())
            time.sleep(0.2)
            for slot, (proc, trial, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[slot]
                free.append(slot)
                if code != 0 and lock_lib.holder(sweep.trial_workdir(trial)) is not None:
                    queue.append(trial)  # refused: another process took the trial first; wait for it
                    continue
                record = read_status(sweep, trial)
                if code != 0 and record.get('status') not in ('failed', 'interrupted'):
                    # killed before it could say so itself
                    write_status(sweep, trial, status='failed', exit_code=code,
                                 error=_last_line(log_path(sweep, trial)), wall_s=time.time() - start)
                    record = read_status(sweep, trial)
                durations.append(time.time() - start)
                if code == 0:
                    finished += 1
                elif record.get('status') != 'interrupted':
                    failed.append(trial)
                left = len(queue) + len(running)
                eta = sum(durations) / len(durations) * left / parallel if left else 0.0
                verdict = 'done' if code == 0 else record.get('status', 'failed')
                print(f'[{finished}/{total} done, {len(running)} running, {len(failed)} failed, {len(queue)} left, '
                      f'ETA {format_duration(eta)}] trial {trial.index} ({trial.name}) {verdict} in '
                      f'{format_duration(time.time() - start)}: {_shown(record)}', file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.close()
        for s, h in old.items():
            signal.signal(s, h)
    print(summary_table(sweep), file=sys.stderr, flush=True)
    if stop['signal'] is not None:
        return 128 + stop['signal']
    return 1 if failed else 0


def _last_line(path: str) -> str:
    try:
        with open(path, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    return lines[-1][:300] if lines else ''


def summary_table(sweep: Sweep) -> str:
    """One line per trial: index, status, the shown metric, wall time, name."""
    rows = ['  #  status       metric                    wall     trial']
    for trial in sweep.trials:
        record = read_status(sweep, trial)
        wall = record.get('wall_s')
        rows.append(f'{trial.index:>3}  {record.get("status", "pending"):<11}  {_shown(record)[:24]:<24}  '
                    f'{format_duration(wall) if wall else "-":>7}  {trial.name}')
    return '\n'.join(rows)
