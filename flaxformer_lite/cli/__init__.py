"""The command line: one experiment, a sweep, a report, an evaluation, a description.

    python launch.py --config=configs/recall.py:quick --workdir=runs/recall_quick
    python launch.py --config=configs/recall.py:model=lstm,size=tiny --workdir=runs/l1 --config.train.steps=2000
    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/lr --parallel=2
    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/lr --dry_run
    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/lr --slurm --slurm_args="--time=1:00:00"
    python launch.py --report --workdir=runs/lr               # or --workdir=runs/a,runs/b
    python launch.py --eval_only --workdir=runs/l1 --config.eval.dependency_lengths=(16,32)
    python launch.py --config=configs/recall.py --describe
    python launch.py --generate --workdir=runs/lm --prompt="def main(" --max_new_tokens=200 --temperature=0.8
    python launch.py --config=configs/recall.py --show_examples=3

`--config=FILE.py[:ARG]` loads `get_config(ARG)` from FILE (and `get_sweep(ARG)` with
--sweep); `--config.a.b=value` overrides one field (of every trial, in a sweep).
Running again on a workdir resumes it. Several hosts: `jax.distributed` is started on
SLURM / Open MPI / Cloud TPU, or explicitly with `--coordinator=HOST:PORT
--num_processes=N --process_id=I`. Mistakes in config, flags, files or workdir print
one line and exit with status 2.

Exit statuses: 0 done; 1 a bug (with its traceback), or a sweep with a failed trial;
2 a user error (nothing was written; the line names the field and the fix), also a
workdir in use by another process; 3 a NaN/Inf loss or gradient stopped training (the
last checkpoint is intact); 4 the workdir's disk refused a write (full, read-only); 5 a
multi-host run lost a process (it never joined, died or hangs); 128+N stopped by signal
N after saving a checkpoint (130 Ctrl-C, 143 SIGTERM). Whatever the status, running
the same command again resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from flaxformer_lite.runtime import exits, supervisor
from flaxformer_lite.errors import UserError

FLAGS_HELP = {
    'config': 'FILE.py[:ARG]: the experiment (get_config(ARG) from FILE)',
    'workdir': 'directory for config.json, checkpoints and TensorBoard events (resumed if it holds the run)',
    'describe': 'print the resolved config, parameter counts and FLOPs per token, then exit',
    'show_examples': 'print N decoded examples of the task (input, target), then exit',
    'coordinator': 'HOST:PORT of process 0, to start jax.distributed explicitly',
    'num_processes': 'number of processes (with --coordinator)',
    'process_id': 'this process (with --coordinator)',
    'distributed_timeout': 'seconds to wait for every process to arrive, and after which a process that sends '
                           'no heartbeat counts as dead and ends the run (default 300)',
    'quiet': 'no progress output',
    'eval_only': 'evaluate the latest checkpoint of --workdir (eval and test splits) and update its results.json',
    'sweep': "run the trials of the config file's get_sweep(ARG), each in a folder of --workdir",
    'dry_run': 'with --sweep: list the trials (index, name, overrides, estimated FLOPs) and exit',
    'parallel': 'with --sweep: trials run at a time, as separate processes (default 1)',
    'trial': 'with --sweep: run trial I alone (what a scheduler calls)',
    'stage': 'with --sweep --trial: tune runs a trial of the tuning stage of a tuned sweep (default: main)',
    'slurm': 'with --sweep: write DIR/sweep.sbatch, a job array over the unfinished trials, and submit it '
             '(--slurm=write: only write it)',
    'slurm_args': 'with --slurm: sbatch options for every array task, e.g. "--partition=gpu --gres=gpu:1"',
    'report': 'write tables, scaling fits and plots of the runs in --workdir (several: --workdir=A,B)',
    'report_dir': 'with --report: where to write it (default: WORKDIR/report)',
    'generate': 'continue --prompt with the trained model of --workdir (language models), or decode it as the '
                'input (sequence-to-sequence), and print the result',
    'prompt': 'with --generate: the text to start from, in the task\'s notation (bytes for text_lm, token names '
              'as --show_examples prints them otherwise)',
    'prompt_file': 'with --generate: read the prompt from this file',
    'max_new_tokens': 'with --generate: tokens to add to a language model\'s prompt (default 64)',
    'temperature': 'with --generate: sampling temperature; 0 is greedy (default 1)',
    'top_k': 'with --generate: sample among the k most likely tokens (default 0: all)',
    'beam': 'with --generate: beam search of width N instead of sampling',
    'seed': 'with --generate: the sampling seed (default 0)',
}
MODES = ('sweep', 'report', 'eval_only', 'describe', 'show_examples', 'generate')
GENERATE_FLAGS = ('prompt', 'prompt_file', 'max_new_tokens', 'temperature', 'top_k', 'beam', 'seed')


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
    flag('stage', choices=('main', 'tune'), default='main')
    flag('slurm', nargs='?', const='submit', choices=('submit', 'write'))
    flag('slurm_args', default='')
    flag('report', action='store_true')
    flag('report_dir')
    flag('generate', action='store_true')
    flag('prompt')
    flag('prompt_file')
    flag('max_new_tokens', type=int)
    flag('temperature', type=float)
    flag('top_k', type=int)
    flag('beam', type=int, metavar='N')
    flag('seed', type=int)
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
    if args.stage != 'main' and args.trial is None:
        raise UserError(f'--stage={args.stage} needs --sweep --trial=I (the runner starts each stage itself)')
    if args.parallel < 1:
        raise UserError(f'--parallel={args.parallel} must be at least 1')
    if args.sweep and args.trial is not None and (args.slurm or args.dry_run or args.parallel != 1):
        raise UserError('--trial=I runs one trial; leave out --slurm, --dry_run and --parallel')
    if args.report_dir and not args.report:
        raise UserError('--report_dir needs --report')
    for name in GENERATE_FLAGS:
        if getattr(args, name) is not None and not args.generate:
            raise UserError(f'--{name} needs --generate (and --workdir of a trained run)')
    if args.generate and (args.prompt is None) == (args.prompt_file is None):
        raise UserError('--generate needs the text to start from: --prompt=TEXT or --prompt_file=FILE (one of them)')
    if (args.eval_only or args.report or args.sweep or args.generate) and not args.workdir:
        mode = next(m for m in ('eval_only', 'report', 'sweep', 'generate') if getattr(args, m))
        raise UserError(f'--{mode} needs --workdir=DIR')
    if not args.config and not (args.eval_only or args.report or args.generate):
        raise UserError('--config=FILE.py[:ARG] is required, e.g. --config=configs/recall.py:quick')
    if args.show_examples < 0:
        raise UserError('--show_examples must be a positive number of examples')
    if args.slurm_args and not args.slurm:
        raise UserError('--slurm_args needs --slurm (and --sweep)')
    if args.distributed_timeout <= 0:
        raise UserError(f'--distributed_timeout={args.distributed_timeout} must be a positive number of seconds')
    if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
        raise UserError('--coordinator needs --num_processes=N and --process_id=I as well')
    if args.coordinator is None and (args.num_processes is not None or args.process_id is not None):
        raise UserError('--num_processes/--process_id need --coordinator=HOST:PORT (the address of process 0)')
    if args.coordinator is not None and not 0 <= args.process_id < args.num_processes:
        raise UserError(f'--process_id={args.process_id} must be in [0, {args.num_processes}): one of the '
                        f'--num_processes={args.num_processes} processes')


def show_examples(exp, n: int) -> str:
    lines = []
    for i in range(n):
        inputs, target = exp.task.decode(exp.task.example('train', i))
        lines += [f'example {i}', f'  input:  {inputs}', f'  target: {target}']
    return '\n'.join(lines)


def describe(exp) -> str:
    from flaxformer_lite import accounting, config as config_lib
    import flax.linen as nn
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
    lines = [config_lib.to_json(exp.config.to_dict()), accounting.describe(exp),
             f'(analytic counts {check} the parameter tree)']
    from flaxformer_lite.train import transfer
    params = nn.unbox(tree)
    init_plan = transfer.plan(exp.config, params, exp.model_cfg)
    lines += init_plan.lines() if init_plan else []
    if exp.config.train.freeze:
        frozen = [p for p, f in transfer.flat_paths(transfer.frozen_mask(exp.config.train.freeze, params)).items() if f]
        lines.append(f'train.freeze: {len(frozen)} parameter arrays fixed ({", ".join(frozen[:4])}'
                     f'{", ..." if len(frozen) > 4 else ""})')
    return '\n'.join(lines)


def run_generate(args: argparse.Namespace, exp) -> int:
    from flaxformer_lite.cli import generate
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding='utf-8') as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f'--prompt_file={args.prompt_file} cannot be read ({e}); give a UTF-8 text file') from None
    given = {k: getattr(args, k) for k in ('max_new_tokens', 'temperature', 'top_k', 'beam', 'seed')}
    opts = generate.Options(**{k: v for k, v in given.items() if v is not None})
    text, step = generate.generate(exp, args.workdir, prompt, opts)
    if not args.quiet:
        print(f'{args.workdir}, step {step}:', file=sys.stderr)
    print(text)
    return 0


def _saved_config(workdir: str, overrides: dict[str, str]):
    """The config stored in a run's workdir, with `--config.*` overrides applied."""
    from flaxformer_lite import config
    from flaxformer_lite.train import checkpoint
    path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f'--workdir={workdir} holds no run ({checkpoint.CONFIG_FILE} missing); give the workdir of a '
                        f'trained run')
    cfg = config.from_saved(checkpoint.read_config(workdir), path)
    for dotted, raw in overrides.items():
        config.set_field(cfg, dotted, raw)
    return cfg


def dry_run(sweep) -> str:
    """The trials, with the training FLOPs each would spend (or why it cannot run)."""
    from flaxformer_lite import accounting, resolve
    from flaxformer_lite.sweep import runner
    lines = [f'sweep {sweep.name}: {len(sweep.trials)} trials ({"recorded" if sweep.recorded else "new or extended"}); '
             f'swept: {", ".join(sweep.swept_fields) or "-"}']
    total = 0.0
    for trial in sweep.trials:
        try:
            exp = resolve.from_config(sweep.trial_config(trial))
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
    from flaxformer_lite.runtime import lock
    from flaxformer_lite.sweep import plan, runner, slurm, stages
    tuned = plan.tuned_definition(args.config, overrides) is not None
    if tuned and args.dry_run:
        print(dry_run(plan.load(args.config, overrides, args.workdir, stage='tune')))
        print(dry_run(plan.load(args.config, overrides, args.workdir, provisional=True)))
        return 0
    if tuned and args.trial is None:
        if args.slurm:
            slurm.sbatch_options(args.slurm_args)
            lock.check_free(args.workdir)
            return stages.submit_slurm(args.config, overrides, args.workdir, args.slurm_args, args.slurm == 'submit')
        held = lock.acquire(args.workdir, kind='sweep')
        try:
            return stages.run_local(args.config, overrides, args.workdir, args.parallel)
        finally:
            held.release()
    if tuned and args.stage == 'main':
        stages.ensure_choice(args.config, overrides, args.workdir)
    sweep = plan.load(args.config, overrides, args.workdir, stage=args.stage)
    if args.dry_run:
        print(dry_run(sweep))
        return 0
    if args.trial is not None:
        if not 0 <= args.trial < len(sweep.trials):
            raise UserError(f'--trial={args.trial} is out of range: the sweep has trials 0..{len(sweep.trials) - 1}')
        if not sweep.recorded and tuned:  # array tasks record the main trials they chose alike
            sweep.record()
        if not sweep.recorded:  # a scheduler's task: the sweep must have been written by the command that made it
            if not os.path.isfile(os.path.join(sweep.workdir, plan.SWEEP_FILE)):
                sweep.record()
            else:
                raise UserError(f'--trial: the sweep in {args.workdir} was defined with other trials; rerun the sweep '
                                f'command (without --trial) to record the new definition first')
        return runner.run_trial(sweep, args.trial, verbose=not args.quiet)
    if args.slurm:
        slurm.sbatch_options(args.slurm_args)  # a bad option is refused before sweep.json is written
        lock.check_free(args.workdir)  # not while a local runner runs this sweep
        sweep.record()
        path, todo = slurm.write_script(sweep, args.slurm_args)
        if not todo:
            print(f'sweep {sweep.name}: every trial is done; nothing to submit', file=sys.stderr)
            return 0
        print(f'wrote {path}: a job array over {len(todo)} unfinished trials', file=sys.stderr)
        if args.slurm == 'submit':
            job = slurm.submit(path)
            print(f'submitted job {job}; `squeue -j {job}` follows it, `--report` reads the results', file=sys.stderr)
        return 0
    held = lock.acquire(args.workdir, kind='sweep')  # one runner per sweep; a second is refused here
    try:
        sweep.record()
        return runner.run_local(sweep, args.parallel)
    finally:
        held.release()


def run_report(args: argparse.Namespace) -> int:
    from flaxformer_lite import analysis
    paths = [p for p in args.workdir.split(',') if p]
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f'--report: --workdir={path} is not a directory; give sweep or run workdirs')
    out_dir = args.report_dir or os.path.join(paths[0], 'report')
    out = analysis.write_report(paths, out_dir, _report_options(args.config, paths))
    print(f"wrote {out['paths']['report_md']} ({sum(out['summary']['runs'].values())} runs: "
          f"{', '.join(f'{n} {s}' for s, n in out['summary']['runs'].items())})")
    return 0


def _report_options(config_ref: str | None, paths: list[str]):
    """What the experiment file says its report shows (`get_report(arg)`), found from
    --config or from the first sweep's sweep.json; None: the report chooses."""
    if config_ref is None:
        try:
            with open(os.path.join(paths[0], 'sweep.json')) as f:
                config_ref = json.load(f)['config']
        except (OSError, ValueError, KeyError):
            return None
    path, _, arg = config_ref.partition(':')
    if not os.path.isfile(path):
        return None
    from flaxformer_lite import config
    module = config._module(path)  # noqa: SLF001
    return config.call(module, 'get_report', arg or None, path) if hasattr(module, 'get_report') else None


def main(argv: list[str]) -> int:
    """launch.py's command line; returns the exit status (runtime/exits.py)."""
    return exits.run(lambda: _main(argv))


def _main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    if (not (args.sweep or args.report) and not os.environ.get(supervisor.SUPERVISED)
            and (args.coordinator is not None or supervisor.cluster_launch())):
        return supervisor.supervise(argv, args)
    if args.report:
        return run_report(args)
    if args.sweep:  # before importing jax: a refused runner or trial says so at once
        return run_sweep(args, overrides)
    from flaxformer_lite import config, resolve, sharding
    cfg = config.load(args.config, overrides) if args.config else _saved_config(args.workdir, overrides)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                    timeout_s=args.distributed_timeout)
    exp = resolve.from_config(cfg)
    if args.describe:
        print(describe(exp))
        return 0
    if args.show_examples:
        print(show_examples(exp, args.show_examples))
        return 0
    if not args.workdir:
        raise UserError('--workdir=DIR is required to train (or use --describe / --show_examples=N)')
    if args.eval_only:
        from flaxformer_lite.cli import eval_only
        eval_only.evaluate_run(exp, args.workdir, verbose=not args.quiet)
        return 0
    if args.generate:
        return run_generate(args, exp)
    from flaxformer_lite import train
    from flaxformer_lite.runtime.hooks import shell_hooks
    result = train.train_and_evaluate(exp, args.workdir, verbose=not args.quiet, hooks=shell_hooks())
    return exits.of_result(result)
