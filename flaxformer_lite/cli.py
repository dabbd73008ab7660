"""Run one experiment, evaluate a trained one again, describe it, or show its task.

    python launch.py --config=configs/recall.py:quick --workdir=runs/recall_quick
    python launch.py --config=configs/recall.py:model=lstm,size=tiny --workdir=runs/l1 --config.train.steps=2000
    python launch.py --eval_only --workdir=runs/l1 --config.eval.dependency_lengths=(16,32)
    python launch.py --config=configs/recall.py --describe
    python launch.py --config=configs/recall.py --show_examples=3

`--config=FILE.py[:ARG]` loads `get_config(ARG)` from FILE; `--config.a.b=value`
overrides one field. Running again on a workdir resumes it. Several hosts:
`jax.distributed` is started on SLURM / Open MPI / Cloud TPU, or explicitly with
`--coordinator=HOST:PORT --num_processes=N --process_id=I`.
Mistakes in config, flags, files or workdir print one line and exit with status 2.
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
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f'{message}; see python launch.py --help')


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument('--config', help=FLAGS_HELP['config'])
    parser.add_argument('--workdir', help=FLAGS_HELP['workdir'])
    parser.add_argument('--describe', action='store_true', help=FLAGS_HELP['describe'])
    parser.add_argument('--show_examples', type=int, default=0, metavar='N', help=FLAGS_HELP['show_examples'])
    parser.add_argument('--coordinator', help=FLAGS_HELP['coordinator'])
    parser.add_argument('--num_processes', type=int, help=FLAGS_HELP['num_processes'])
    parser.add_argument('--process_id', type=int, help=FLAGS_HELP['process_id'])
    parser.add_argument('--distributed_timeout', type=int, default=300, help=FLAGS_HELP['distributed_timeout'])
    parser.add_argument('--quiet', action='store_true', help=FLAGS_HELP['quiet'])
    parser.add_argument('--eval_only', action='store_true', help=FLAGS_HELP['eval_only'])
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
    if args.eval_only and not args.workdir:
        raise UserError('--eval_only needs --workdir=DIR, the run to evaluate')
    if not args.config and not args.eval_only:
        raise UserError('--config=FILE.py[:ARG] is required, e.g. --config=configs/recall.py:quick')
    if args.show_examples < 0:
        raise UserError('--show_examples must be a positive number of examples')
    return args, overrides


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


def main(argv: list[str]) -> int:
    try:
        args, overrides = parse(argv)
        from flaxformer_lite import config, experiment, parallel
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
