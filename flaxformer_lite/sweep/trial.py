"""One sweep trial, started from (sweep workdir, trial index): the single entry point
that the local runner (through its fork server, or as a subprocess), SLURM's array
tasks and `launch.py --sweep --trial=I` all use.

    python -m flaxformer_lite.sweep.trial --workdir=SWEEP --trial=I [--stage=tune] [--quiet]

The trial's config is what the sweep recorded (sweep.json: the experiment file, the
sweep-wide `--config.*` overrides and the trial's own fields), so a trial runs what the
sweep defined, whoever starts it. `runner.run_trial` runs it: the trial's workdir lock
first (a trial that another process runs is refused before anything is written), then
its status file and the training run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flaxformer_lite.errors import UserError
from flaxformer_lite.runtime import exits
from flaxformer_lite.sweep import plan, runner, stages, tuning


def recorded_sweep(workdir: str, stage: str = 'main') -> plan.Sweep:
    """The sweep recorded in `workdir` (its tuning stage for stage='tune'). A main trial
    of a tuned sweep started alone (an array task after the tuning array) makes the
    choice first if no task has, and records the main trials alike."""
    sources = [os.path.join(workdir, plan.SWEEP_FILE)]
    if stage == 'main':  # before any main trial is recorded, the tuning stage's record names the sweep
        sources.append(os.path.join(workdir, tuning.TUNE_DIR, plan.SWEEP_FILE))
    else:
        sources = [os.path.join(workdir, tuning.TUNE_DIR, plan.SWEEP_FILE)]
    record = None
    for path in sources:
        try:
            with open(path) as f:
                record = json.load(f)
            break
        except OSError:
            continue
        except ValueError as e:
            raise UserError(f'--workdir={workdir}: cannot read {path} ({e}); restore it or rerun the sweep command '
                            f'in a new --workdir') from None
    if record is None or 'config' not in record:
        raise UserError(f'--workdir={workdir} holds no recorded sweep ({plan.SWEEP_FILE} missing); run the sweep '
                        f'command (launch.py --config=... --sweep --workdir={workdir}) first')
    config, overrides = record['config'], dict(record.get('overrides', {}))
    tuned = plan.tuned_definition(config, overrides) is not None
    if tuned and stage == 'main':
        stages.ensure_choice(config, overrides, workdir)
    sweep = plan.load(config, overrides, workdir, stage=stage)
    if not sweep.recorded:
        if not tuned:
            raise UserError(f'--trial: the sweep in {workdir} was defined with other trials; rerun the sweep command '
                            f'(without --trial) to record the new definition first')
        sweep.record()  # array tasks record the main trials they chose alike
    return sweep


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m flaxformer_lite.sweep.trial',
                                     description='Run one trial of a recorded sweep.')
    parser.add_argument('--workdir', required=True, help='the sweep workdir (where sweep.json is)')
    parser.add_argument('--trial', type=int, required=True, help='the trial index')
    parser.add_argument('--stage', default='main', choices=('main', 'tune'),
                        help='tune: a trial of the tuning stage of a tuned sweep')
    parser.add_argument('--quiet', action='store_true', help='no progress lines')
    args = parser.parse_args(argv)
    return exits.run(lambda: runner.run_trial(recorded_sweep(args.workdir, args.stage), args.trial,
                                              verbose=not args.quiet))


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
