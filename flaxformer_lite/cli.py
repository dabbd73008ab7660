"""The command line: one experiment, a sweep, a report, an evaluation, a description.

    python launch.py --config=configs/recall.py:quick --workdir=runs/recall_quick
    python launch.py --config=configs/recall.py:model=lstm,size=tiny --workdir=runs/l1 --config.train.steps=2000
    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/lr --parallel=2
    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/lr --dry_run
    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/lr --slurm --slurm_args="--time=1:00:00"
    python launch.py --report --workdir=runs/lr               # or --workdir=runs/a,runs/b
    python launch.py --eval_only --workdir=runs/l1 --config.eval.dependency_lengths=(16,32)
    python launch.py --config=configs/recall.py --describe
    python launch.py --config=configs/recall.py --show_examples=3

`--config=FILE.py[:ARG]` loads `get_config(ARG)` from FILE (and `get_sweep(ARG)` with
--sweep); `--config.a.b=value` overrides one field (of every trial, in a sweep).
Running again on a workdir resumes it. Several hosts: `jax.distributed` is started on
SLURM / Open MPI / Cloud TPU, or explicitly with `--coordinator=HOST:PORT
--num_processes=N --process_id=I`. Mistakes in config, flags, files or workdir print
one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from flaxformer_lite.errors import UserError

FLAGS_HELP = {
    'config': 'FILE.py[:ARG]: the experiment (get_config(ARG) from FILE)',
    'workdir': 'directory for config.json, checkpoints and TensorBoard events (resumed if it holds the run)',
    'describe': 'print the resolved config, parameter counts and FLOPs per token, then exit',
    'show_examples': 'print N decoded examples of the task (input, target), then exit',
    'coordinator': 'HOST:PORT of process 0, to start jax.distributed explicitly',
    'num_processes': 'number of processes (with --coordinator)',
    'process_id': 'this process (with --coordinator)',
    'distributed_timeout': 'seconds to wait for every process to arrive (default 300)',
    'quiet': 'no progress output',
    'eval_only': 'evaluate the latest checkpoint of --workdir (eval and test splits) and update its results.json',
    'sweep': "run the trials of the config file's get_sweep(ARG), each in a folder of --workdir",
    'dry_run': 'with --sweep: list the trials (index, name, overrides, estimated FLOPs) and exit',
    'parallel': 'with --sweep: trials run at a time, as separate processes (default 1)',
    'trial': 'with --sweep: run trial I alone (what a scheduler calls)',
    'slurm': 'with --sweep: write DIR/sweep.sbatch, a job array over the unfinished trials, and submit it '
             '(--slurm=write: only write it)',
    'slurm_args': 'with --slurm: sbatch options for every array task, e.g. "--partition=gpu --gres=gpu:1"',
    'report': 'write tables, scaling fits and plots of the runs in --workdir (several: --workdir=A,B)',
    'report_dir': 'with --report: where to write it (default: WORKDIR/report)',
}
MODES = ('sweep', 'report', 'eval_only', 'describe', 'show_examples')


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f'{message}; see python launch.py --help')


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    flag = lambda name, **kw: parser.add_argument(f'--{name}', help=FLAGS_HELP[name], **kw)  # noqa: E731
    flag('config')
    flag('workdir')
    flag('describe', action='store_true')
    flag('show_examples', type=int, default=0, metavar='N')
    flag('coordinator')
    flag('num_processes', type=int)
    flag('process_id', type=int)
    flag('distributed_timeout', type=int, default=300)
    flag('quiet', action='store_true')
    flag('eval_only', action='store_true')
    flag('sweep', action='store_true')
    flag('dry_run', action='store_true')
    flag('parallel', type=int, default=1, metavar='N')
    flag('trial', type=int, metavar='I')
    flag('slurm', nargs='?', const='submit', choices=('submit', 'write'))
    flag('slurm_args', default='')
    flag('report', action='store_true')
    flag('report_dir')
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    for item in rest:
        if item.startswith('--config.'):
            key, eq, value = item[len('--config.'):].partition('=')
            if not eq:
                raise UserError(f'{item} needs a value: --config.{key}=VALUE')
            overrides[key] = value
        else:
            name = item.lstrip('-').split('=')[0]
            close = difflib.get_close_matches(name, list(FLAGS_HELP), n=1)
            hint = f'did you mean --{close[0]}?' if close else 'see python launch.py --help'
            raise UserError(f"unknown flag '{item}'; {hint}")
    _check_flags(args)
    return args, overrides


def _check_flags(args: argparse.Namespace) -> None:
    chosen = [m for m in MODES if getattr(args, m)]
    if len(chosen) > 1:
        raise UserError(f'--{chosen[0]} and --{chosen[1]} cannot be combined; run them one after the other')
    for name in ('dry_run', 'trial', 'slurm'):
        if getattr(args, name) not in (None, False) and not args.sweep:
            raise UserError(f'--{name} needs --sweep (and --config=FILE.py with a get_sweep)')
    if args.parallel != 1 and not args.sweep:
        raise UserError('--parallel needs --sweep')
    if args.parallel < 1:
        raise UserError(f'--parallel={args.parallel} must be at least 1')
    if args.sweep and args.trial is not None and (args.slurm or args.dry_run or args.parallel != 1):
        raise UserError('--trial=I runs one trial; leave out --slurm, --dry_run and --parallel')
    if args.report_dir and not args.report:
        raise UserError('--report_dir needs --report')
    if (args.eval_only or args.report or args.sweep) and not args.workdir:
        mode = next(m for m in ('eval_only', 'report', 'sweep') if getattr(args, m))
        raise UserError(f'--{mode} needs --workdir=DIR')
    if not args.config and not (args.eval_only or args.report):
        raise UserError('--config=FILE.py[:ARG] is required, e.g. --config=configs/recall.py:quick')
    if args.show_examples < 0:
        raise UserError('--show_examples must be a positive number of examples')


def show_examples(exp, n: int) -> str:
    lines = []
    for i in range(n):
        inputs, target = exp.task.decode(exp.task.example('train', i))
        lines += [f'example {i}', f'  input:  {inputs}', f'  target: {target}']
    return '\n'.join(lines)


def describe(exp) -> str:
    from flaxformer_lite import accounting, config as config_lib
    import jax
    import jax.numpy as jnp
    import numpy as np
    model = exp.family.build(exp.model_cfg, exp.spec)
    example = exp.task.example('train', 0)
    dummy = {k: jnp.asarray(np.expand_dims(v, 0)) for k, v in example.items()}
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)['params'])
    counts = accounting.tree_counts(tree)
    analytic = exp.family.count_params(exp.model_cfg, exp.spec)
    check = 'equal to' if counts == analytic else f'MISMATCH with {counts}'
    return '\n'.join([config_lib.to_json(exp.config.to_dict()), accounting.describe(exp),
                      f'(analytic counts {check} the parameter tree)'])


def _saved_config(workdir: str, overrides: dict[str, str]):
    """The config stored in a run's workdir, with `--config.*` overrides applied."""
    from flaxformer_lite import config
    from flaxformer_lite.train import checkpoint
    path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f'--workdir={workdir} holds no run ({checkpoint.CONFIG_FILE} missing); give the workdir of a '
                        f'trained run')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir={workdir}: cannot read {checkpoint.CONFIG_FILE} ({e})') from None
    cfg = config.from_saved(saved, path)
    for dotted, raw in overrides.items():
        config.set_field(cfg, dotted, raw)
    return cfg


def dry_run(sweep) -> str:
    """The trials, with the training FLOPs each would spend (or why it cannot run)."""
    from flaxformer_lite import accounting, experiment
    from flaxformer_lite.sweep import runner
    lines = [f'sweep {sweep.name}: {len(sweep.trials)} trials ({"recorded" if sweep.recorded else "new or extended"}); '
             f'swept: {", ".join(sweep.swept_fields) or "-"}']
    total = 0.0
    for trial in sweep.trials:
        try:
            exp = experiment.resolve(sweep.trial_config(trial))
            flops = accounting.summary(exp)['flops_per_example'] * exp.config.train.steps * exp.config.train.batch_size
            total += flops
            cost = f'{flops:.3g} FLOPs ({exp.config.train.steps} steps)'
        except UserError as e:
            cost = f'cannot run: {e}'
        status = runner.read_status(sweep, trial).get('status', 'pending')
        overrides = ', '.join(f'{k}={v!r}' for k, v in trial.overrides.items())
        lines.append(f'{trial.index:>4}  {status:<8} {trial.name}\n        {overrides}\n        {cost}')
    lines.append(f'total: {total:.3g} training FLOPs')
    return '\n'.join(lines)


def run_sweep(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from flaxformer_lite.sweep import plan, runner, slurm
    sweep = plan.load(args.config, overrides, args.workdir)
    if args.dry_run:
        print(dry_run(sweep))
        return 0
    if args.trial is not None:
        if not 0 <= args.trial < len(sweep.trials):
            raise UserError(f'--trial={args.trial} is out of range: the sweep has trials 0..{len(sweep.trials) - 1}')
        if not sweep.recorded:  # a scheduler's task: the sweep must have been written by the command that made it
            if not os.path.isfile(os.path.join(args.workdir, plan.SWEEP_FILE)):
                sweep.record()
            else:
                raise UserError(f'--trial: the sweep in {args.workdir} was defined with other trials; rerun the sweep '
                                f'command (without --trial) to record the new definition first')
        return runner.run_trial(sweep, args.trial, verbose=not args.quiet)
    sweep.record()
    if args.slurm:
        path, todo = slurm.write_script(sweep, args.slurm_args)
        if not todo:
            print(f'sweep {sweep.name}: every trial is done; nothing to submit', file=sys.stderr)
            return 0
        print(f'wrote {path}: a job array over {len(todo)} unfinished trials', file=sys.stderr)
        if args.slurm == 'submit':
            job = slurm.submit(path)
            print(f'submitted job {job}; `squeue -j {job}` follows it, `--report` reads the results', file=sys.stderr)
        return 0
    return runner.run_local(sweep, args.parallel)


def run_report(args: argparse.Namespace) -> int:
    from flaxformer_lite import analysis
    paths = [p for p in args.workdir.split(',') if p]
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f'--report: --workdir={path} is not a directory; give sweep or run workdirs')
    out_dir = args.report_dir or os.path.join(paths[0], 'report')
    out = analysis.write_report(paths, out_dir, _report_spec(args.config, paths))
    print(f"wrote {out['paths']['report_md']} ({sum(out['summary']['runs'].values())} runs: "
          f"{', '.join(f'{n} {s}' for s, n in out['summary']['runs'].items())})")
    return 0


def _report_spec(config_spec: str | None, paths: list[str]):
    """What the experiment file says its report shows (`get_report(arg)`), found from
    --config or from the first sweep's sweep.json; None: the report chooses."""
    if config_spec is None:
        try:
            with open(os.path.join(paths[0], 'sweep.json')) as f:
                config_spec = json.load(f)['config']
        except (OSError, ValueError, KeyError):
            return None
    path, _, arg = config_spec.partition(':')
    if not os.path.isfile(path):
        return None
    from flaxformer_lite import config
    module = config._module(path)  # noqa: SLF001
    return module.get_report(arg or None) if hasattr(module, 'get_report') else None


def main(argv: list[str]) -> int:
    try:
        args, overrides = parse(argv)
        if args.report:
            return run_report(args)
        from flaxformer_lite import config, experiment, parallel
        if args.sweep:
            return run_sweep(args, overrides)
        cfg = config.load(args.config, overrides) if args.config else _saved_config(args.workdir, overrides)
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        timeout_s=args.distributed_timeout)
        exp = experiment.resolve(cfg)
        if args.describe:
            print(describe(exp))
            return 0
        if args.show_examples:
            print(show_examples(exp, args.show_examples))
            return 0
        if not args.workdir:
            raise UserError('--workdir=DIR is required to train (or use --describe / --show_examples=N)')
        if args.eval_only:
            from flaxformer_lite.train import eval_only
            eval_only.evaluate_run(exp, args.workdir, verbose=not args.quiet)
            return 0
        from flaxformer_lite import train
        result = train.train_and_evaluate(exp, args.workdir, verbose=not args.quiet)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if result.get('status') == 'interrupted':
        return 128 + int(result['signal'])  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    return 0
