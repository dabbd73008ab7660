"""Running a tuned sweep (sweep/tuning.py): the tuning stage, the choice on the validation
split, then the main trials; here (`--parallel=N`) or as two dependent SLURM job arrays."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Mapping

from flaxformer_lite.errors import UserError
from flaxformer_lite.sweep import plan, runner, tuning


def choose(tuned: tuning.Tuned, tune: plan.Sweep, *, extend: bool = True) -> dict[str, Any]:
    """Select each group's value from the finished tuning trials (validation metric only).
    With `extend=False` a choice at the edge is flagged, never extended."""
    results = [(t.overrides, runner.read_status(tune, t)) for t in tune.trials]
    record = tuning.select(tuned, results, tuning.extensions_of(tune.root))
    if not extend:
        record['extensions'] = {k: v for k, v in record['extensions'].items() if k not in record['pending_extensions']}
        record['pending_extensions'] = {}
    return record


def describe(record: Mapping[str, Any]) -> str:
    lines = [f"tuning: {record['field']} chosen per group on {record['metric']} "
             f"({'lower' if record['lower_is_better'] else 'higher'} is better, mean of {record['seeds']} seed(s))"]
    for g in record['groups']:
        group = ', '.join(f'{k}={v}' for k, v in g['group'].items())
        curve = '  '.join(f'{v:g}: {m:.4g}' if isinstance(v, float) else f'{v}: {m:.4g}' for v, m, _ in g['curve'])
        flag = '  (at the edge of the grid)' if g['at_edge'] else ''
        lines.append(f"  {group}: {g['chosen']}{flag}   [{curve}]")
    return '\n'.join(lines)


def run_local(config: str, overrides: Mapping[str, str], workdir: str, parallel: int) -> int:
    """Tuning trials, the choice (extending an edge choice once), then the main trials.
    The caller holds the workdir's lock. Exit status as runner.run_local."""
    tuned = plan.tuned_definition(config, overrides)
    while True:
        tune = plan.load(config, overrides, workdir, stage='tune')
        tune.record()
        code = runner.run_local(tune, parallel)
        if code:
            print(f'sweep {tune.name}: the tuning stage did not finish; the main trials wait for it (rerun the '
                  f'command)', file=sys.stderr)
            return code
        record = choose(tuned, tune, extend=tuned.extend)
        tuning.write(workdir, record)
        if not record['pending_extensions']:
            break
        print(f"tuning: {len(record['pending_extensions'])} group(s) chose the edge of the grid; one grid step "
              f"beyond it is tried", file=sys.stderr)
    print(describe(record), file=sys.stderr, flush=True)
    main = plan.load(config, overrides, workdir)
    main.record()
    reused = reuse_tuning_runs(tune, main)
    if reused:
        print(f'sweep {main.name}: {reused} main trial(s) are tuning trials already run (the same fields, the same '
              f'seed); their runs are copied from {tuning.TUNE_DIR}/, not trained again', file=sys.stderr)
    return runner.run_local(main, parallel)


def reuse_tuning_runs(tune: plan.Sweep, main: plan.Sweep) -> int:
    """Copy each finished tuning run that a main trial repeats exactly (the same fields and
    seed, so training it again would give the same bits) into that main trial's folder,
    with `reused_from` naming the original in its results.json. A main trial that has a
    folder already is left alone. Returns how many were copied."""
    from flaxformer_lite.train import results as results_lib
    done = {}
    for t in tune.trials:
        record = runner.read_status(tune, t)
        if record.get('status') == 'done':
            done[plan.overrides_key(t.overrides)] = tune.trial_workdir(t)
    copied = 0
    for t in main.trials:
        source = done.get(plan.overrides_key(t.overrides))
        target = main.trial_workdir(t)
        if source is None or os.path.exists(target):
            continue
        partial = target + '.copying'
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        record = results_lib.read(partial)
        record['workdir'] = target
        record['reused_from'] = os.path.relpath(source, main.root)
        results_lib.write(partial, record)
        os.replace(partial, target)  # all or nothing: a killed copy leaves no half-done trial
        copied += 1
    return copied


def ensure_choice(config: str, overrides: Mapping[str, str], workdir: str) -> None:
    """For a main trial started alone (a SLURM array task after the tuning array): make the
    choice from the tuning trials if it is not in tuning.json yet (an edge is flagged)."""
    record = tuning.read(workdir)
    if record is not None and not record.get('pending_extensions'):
        return
    tuned = plan.tuned_definition(config, overrides)
    tune = plan.load(config, overrides, workdir, stage='tune')
    if not all(runner.read_status(tune, t).get('status') == 'done' for t in tune.trials):
        raise UserError(f'--workdir={workdir}: the tuning stage is not finished; run it first (the sweep command '
                        f'without --trial, or its tuning job array)')
    tuning.write(workdir, choose(tuned, tune, extend=False))


def submit_slurm(config: str, overrides: Mapping[str, str], workdir: str, slurm_args: str, submit: bool) -> int:
    """Two job arrays: the tuning trials, then the main trials once every tuning task
    succeeded (`--dependency=afterok`). Tasks of the second array make the choice."""
    from flaxformer_lite.sweep import slurm
    tune = plan.load(config, overrides, workdir, stage='tune')
    tune.record()
    tune_path, tune_todo = slurm.write_script(tune, slurm_args)
    main = plan.load(config, overrides, workdir, provisional=True)
    main_path, main_todo = slurm.write_script(main, slurm_args)
    if not tune_todo and not main_todo:
        print(f'sweep {main.name}: every trial is done; nothing to submit', file=sys.stderr)
        return 0
    print(f'wrote {tune_path or "(tuning done)"} and {main_path}: {len(tune_todo)} tuning and {len(main_todo)} main '
          f'trials', file=sys.stderr)
    if submit:
        after = slurm.submit(tune_path) if tune_todo else None
        job = slurm.submit(main_path, dependency=after) if main_todo else None
        print(f'submitted tuning job {after or "-"} and main job {job or "-"} (after the tuning job succeeded)',
              file=sys.stderr)
    return 0
