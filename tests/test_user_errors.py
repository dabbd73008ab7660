"""The catalogue of mistakes a user can make, in one table: each ends with exit status 2
and one line on stderr that names the field (flag, config field, file, workdir) and the
fix, no traceback, and the workdir byte for byte as it was (paths, sizes, contents).

Cases run in-process through `cli.main` (the same code as launch.py); the last ones run
launch.py as a process, for what only a process shows (the exit status a shell sees,
nothing printed to stdout)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_MODEL, TINY_RECALL, compilation_cache, tree_snapshot  # noqa: F401  (a fixture)

from flaxformer_lite import cli

RECALL = os.path.join(ROOT, 'configs', 'recall.py')
TINY = {**TINY_RECALL, **TINY_MODEL, 'train.batch_size': 16, 'train.steps': 10, 'train.log_every': 5,
        'eval.every_steps': 10, 'eval.num_examples': 32, 'checkpoint.every_steps': 5, 'optim.warmup_steps': 2,
        'checkpoint.async_save': False}
FLAGS = [f'--config.{k}={v}' for k, v in TINY.items()]

SYNTAX_ERROR = 'def get_config(arg):\n    return (1,\n'
RAISES_ON_IMPORT = 'x = 1\ny = 1 / 0\n'
GET_CONFIG_RAISES = 'def get_config(arg):\n    return {}[arg]\n'
SWEEP_FILE = '''
from flaxformer_lite import sweep
from flaxformer_lite.config import make_config

def get_config(arg=None):
    return make_config(arg, task='recall', defaults={{'train.steps': 5}})

def get_sweep(arg=None):
    return {trials}
'''


class Ctx:
    """What a case sets up in its own folder: a copy of one trained run, files, a sweep."""

    def __init__(self, tmp_path, trained):
        self.tmp, self._trained = tmp_path, trained

    def run(self, name='run'):
        path = self.tmp / name
        shutil.copytree(self._trained, path)
        return path

    def file(self, name, text):
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def sweep(self, trials, name='exp.py'):
        return self.file(name, SWEEP_FILE.format(trials=trials))

    def sweep_run(self, trials, *more):
        """A sweep command over `trials` (a Python expression) in tmp/s."""
        return [f'--config={self.sweep(trials)}', '--sweep', f'--workdir={self.tmp / "s"}', *more]

    def train(self, workdir, *more):
        return [f'--config={RECALL}', f'--workdir={workdir}', *FLAGS, *more]


def _edit_json(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _damage_every_checkpoint(run):
    for step in os.listdir(run / 'checkpoints'):
        os.remove(run / 'checkpoints' / step / 'data' / 'process_0-of-1.json')


def _run(c, change):
    """A copy of the trained run, then `change(path)`."""
    path = c.run()
    change(path)
    return path


def _drop_checkpoints(run):
    shutil.rmtree(run / 'checkpoints')


def _truncate_config(run):
    (run / 'config.json').write_text('{')


def _truncate_sweep_json(workdir):
    (workdir / 'sweep.json').write_text('{')


def _mkdir(path, *files):
    path.mkdir()
    for name in files:
        (path / name).write_text('mine')
    return path


def _recorded_sweep(c, change=lambda path: None):
    """A sweep of 2 trials whose sweep.json is written (by --slurm=write), then `change`."""
    workdir = c.tmp / 'sw'
    assert cli.main([f'--config={c.sweep("sweep.seeds(2)", "recorded.py")}', '--sweep', f'--workdir={workdir}',
                     '--slurm=write']) == 0
    change(workdir)
    return workdir


def _live_lock(path):
    path.mkdir(exist_ok=True)
    (path / 'lock.json').write_text(json.dumps({'host': 'gpu-node-7', 'pid': 31337, 'since': '2031-05-04T03:02:01',
                                                'kind': 'training', 'heartbeat': time.time() + 3600, 'token': 't'}))


# (id, setup(ctx) -> (argv, workdir or None), what the line must say: the field, then the fix)
CASES = [
    # -- flags
    ('unknown_flag', lambda c: (['--config=x.py', '--wrkdir=x'], None), ["unknown flag '--wrkdir=x'", 'did you mean --workdir?']),
    ('flag_without_value', lambda c: ([f'--config={RECALL}', '--config.train.steps'], None),
     ['--config.train.steps needs a value', '--config.train.steps=VALUE']),
    ('no_config', lambda c: (['--describe'], None), ['--config=FILE.py[:ARG] is required', 'configs/recall.py']),
    ('no_workdir', lambda c: ([f'--config={RECALL}'], None), ['--workdir=DIR is required', '--describe']),
    ('dry_run_without_sweep', lambda c: ([f'--config={RECALL}', '--dry_run'], None), ['--dry_run needs --sweep']),
    ('parallel_without_sweep', lambda c: ([f'--config={RECALL}', '--parallel=2', '--workdir=x'], None),
     ['--parallel needs --sweep']),
    ('parallel_zero', lambda c: (c.sweep_run('sweep.seeds(2)', '--parallel=0'), c.tmp / 's'),
     ['--parallel=0 must be at least 1']),
    ('two_modes', lambda c: ([f'--config={RECALL}', '--describe', '--show_examples=2'], None),
     ['--describe and --show_examples cannot be combined', 'one after the other']),
    ('report_dir_without_report', lambda c: ([f'--config={RECALL}', '--report_dir=r', '--workdir=x'], None),
     ['--report_dir needs --report']),
    ('negative_show_examples', lambda c: ([f'--config={RECALL}', '--show_examples=-1'], None),
     ['--show_examples must be a positive number']),
    ('slurm_args_without_slurm', lambda c: ([f'--config={RECALL}', '--sweep', '--workdir=x', '--slurm_args=-p gpu'],
                                            None), ['--slurm_args needs --slurm']),
    ('coordinator_alone', lambda c: (c.train(c.tmp / 'w', '--coordinator=127.0.0.1:1234'), c.tmp / 'w'),
     ['--coordinator needs --num_processes=N and --process_id=I']),
    ('processes_without_coordinator', lambda c: (c.train(c.tmp / 'w', '--num_processes=2', '--process_id=0'),
                                                 c.tmp / 'w'), ['--num_processes/--process_id need --coordinator=']),
    ('process_id_out_of_range', lambda c: (c.train(c.tmp / 'w', '--coordinator=h:1', '--num_processes=2',
                                                   '--process_id=2'), c.tmp / 'w'), ['--process_id=2 must be in [0, 2)']),
    ('distributed_timeout_zero', lambda c: (c.train(c.tmp / 'w', '--distributed_timeout=0'), c.tmp / 'w'),
     ['--distributed_timeout=0 must be a positive number of seconds']),
    # -- config fields
    ('unknown_field', lambda c: (c.train(c.tmp / 'w', '--config.train.stepz=5'), c.tmp / 'w'),
     ["unknown config field 'train.stepz'", "did you mean 'train.steps'?"]),
    ('field_of_wrong_type', lambda c: (c.train(c.tmp / 'w', '--config.train.batch_size=big'), c.tmp / 'w'),
     ["config field train.batch_size='big'"]),
    ('zero_steps', lambda c: (c.train(c.tmp / 'w', '--config.train.steps=0'), c.tmp / 'w'),
     ['train.steps=0 must be a positive integer']),
    ('negative_learning_rate', lambda c: (c.train(c.tmp / 'w', '--config.optim.learning_rate=-1'), c.tmp / 'w'),
     ['optim.learning_rate must be positive']),
    ('size_not_in_table', lambda c: (c.train(c.tmp / 'w', '--config.model.size=huge'), c.tmp / 'w'),
     ["model.size='huge' is not in the size table", 'choose one of']),
    ('unknown_model', lambda c: ([f'--config={RECALL}:model=lsmt', f'--workdir={c.tmp / "w"}'], c.tmp / 'w'),
     ["model.name='lsmt' is not a known model"]),
    ('width_not_divisible', lambda c: (c.train(c.tmp / 'w', '--config.model.d_model=33'), c.tmp / 'w'),
     ['model.d_model: 33 is not divisible by model.num_heads=2']),
    ('sequence_too_short', lambda c: (c.train(c.tmp / 'w', '--config.task.dependency_length=100'), c.tmp / 'w'),
     ['task.seq_len']),
    ('unknown_schedule', lambda c: (c.train(c.tmp / 'w', '--config.optim.schedule=linear'), c.tmp / 'w'),
     ["optim.schedule='linear' is not one of cosine, constant, rsqrt"]),
    ('label_smoothing_out_of_range', lambda c: (c.train(c.tmp / 'w', '--config.train.label_smoothing=1.5'),
                                                c.tmp / 'w'), ['train.label_smoothing must be in [0, 1)']),
    ('steps_and_budget', lambda c: (c.train(c.tmp / 'w', '--config.train.tokens=1e6'), c.tmp / 'w'),
     ['train.steps=10 and train.tokens=1e+06 both set the length of the run', 'unset train.steps']),
    ('skip_nonfinite_not_bool', lambda c: (c.train(c.tmp / 'w', '--config.train.skip_nonfinite=maybe'), c.tmp / 'w'),
     ['train.skip_nonfinite']),
    ('unknown_arg_key', lambda c: ([f'--config={RECALL}:colour=red', f'--workdir={c.tmp / "w"}'], c.tmp / 'w'),
     ["config argument 'colour' is not known", 'use model=, size=, task=, quick']),
    ('group_set_as_a_field', lambda c: (c.train(c.tmp / 'w', '--config.model=big'), c.tmp / 'w'),
     ["config field 'model' is a group", 'set one of its fields, e.g. model.']),
    # -- files
    ('config_file_missing', lambda c: ([f'--config={c.tmp / "nope.py"}', '--describe'], None),
     ['nope.py', 'does not exist', 'configs/']),
    ('config_not_python', lambda c: ([f'--config={c.file("exp.yaml", "a: 1")}', '--describe'], None),
     ['expected a Python file', '--config=configs/recall.py']),
    ('config_without_get_config', lambda c: ([f'--config={c.file("exp.py", "x = 1")}', '--describe'], None),
     ['exp.py', 'defines no get_config(arg)']),
    ('config_syntax_error', lambda c: (['--config=' + c.file('exp.py', SYNTAX_ERROR), '--describe'], None),
     ['exp.py, line ', 'SyntaxError', 'fix the file']),
    ('config_raises_on_import', lambda c: (['--config=' + c.file('exp.py', RAISES_ON_IMPORT), '--describe'], None),
     ['exp.py, line 2', 'ZeroDivisionError: division by zero']),
    ('get_config_raises', lambda c: (['--config=' + c.file('exp.py', GET_CONFIG_RAISES), '--describe'], None),
     ['exp.py, line 2: get_config(None) raised KeyError']),
    ('no_get_sweep', lambda c: ([f'--config={RECALL}', '--sweep', f'--workdir={c.tmp / "s"}'], c.tmp / 's'),
     ['defines no get_sweep(arg)', 'add one that returns a list of trials']),
    ('get_sweep_raises', lambda c: (c.sweep_run('[{}][3]'), c.tmp / 's'),
     ['exp.py, line 9: get_sweep(None) raised IndexError']),
    # -- workdirs
    ('workdir_is_a_file', lambda c: (c.train(c.file('notes.txt', 'mine')), c.tmp / 'notes.txt'),
     ['notes.txt is a file, not a directory', 'choose another --workdir']),
    ('workdir_of_something_else', lambda c: (c.train(_mkdir(c.tmp / 'thesis', 'ch1.tex')), c.tmp / 'thesis'),
     ['holds no flaxformer_lite run (config.json missing)', 'choose a new or empty --workdir']),
    ('workdir_of_another_experiment', lambda c: (c.train(c.run(), '--config.model.d_model=48'), c.tmp / 'run'),
     ['holds a run with model.d_model=32, not 48', 'continue it with its own config or choose a new --workdir']),
    ('resume_with_other_batch_size', lambda c: (c.train(c.run(), '--config.train.batch_size=8'), c.tmp / 'run'),
     ['holds a run with train.batch_size=16, not 8']),
    ('config_json_truncated', lambda c: (c.train(_run(c, lambda r: (r / 'config.json').write_text('{"mod'))),
                                         c.tmp / 'run'), ['config.json is damaged', 'restore it']),
    ('config_json_not_a_config', lambda c: (c.train(_run(c, lambda r: (r / 'config.json').write_text('[1, 2]'))),
                                            c.tmp / 'run'), ['config.json is not a flaxformer_lite config (edited by hand?)']),
    ('config_json_edited_by_hand', lambda c: (c.train(_run(c, lambda r: _edit_json(
        r / 'config.json', lambda j: j['model'].update(d_model=64)))), c.tmp / 'run'),
     ['holds a run with model.d_model=64, not 32']),
    ('results_json_truncated', lambda c: (c.train(_run(c, lambda r: (r / 'results.json').write_text('{"sta'))),
                                          c.tmp / 'run'),
     ['results.json is damaged', 'delete it to have the run evaluate its last checkpoint']),
    ('results_json_edited_by_hand', lambda c: (c.train(_run(c, lambda r: _edit_json(
        r / 'results.json', lambda j: j['metrics'].update({'test/accuracy': 0.99})))), c.tmp / 'run'),
     ['results.json was edited by hand or is damaged', 'do not match its checksum']),
    ('results_json_unknown_status', lambda c: (c.train(_run(c, lambda r: _edit_json(
        r / 'results.json', lambda j: j.update(status='finished')))), c.tmp / 'run'),
     ["status='finished' is not one of done, evaluated"]),
    ('every_checkpoint_damaged', lambda c: (c.train(_run(c, _damage_every_checkpoint), '--config.train.steps=15'),
                                            c.tmp / 'run'),
     ['holds a run but no readable checkpoint (step 10: data/process_0-of-1.json is missing',
      'delete --workdir to start the run again']),
    ('finished_run_without_checkpoints', lambda c: (c.train(_run(c, lambda r: shutil.rmtree(r / 'checkpoints')),
                                                            '--config.train.steps=15'), c.tmp / 'run'),
     ['holds a finished run (results.json) but no checkpoint', 'restore checkpoints/']),
    ('workdir_in_use', lambda c: (c.train(_run(c, _live_lock), '--config.train.steps=15'), c.tmp / 'run'),
     ['is in use by pid 31337 on host gpu-node-7 since 2031-05-04T03:02:01', 'wait for it to finish or stop it']),
    # -- mesh (one CPU device here)
    ('mesh_axis_zero', lambda c: (c.train(c.tmp / 'w', '--config.mesh.data=0'), c.tmp / 'w'),
     ['mesh.data/fsdp/tensor=[0, 1, 1]', 'use positive sizes']),
    ('mesh_larger_than_devices', lambda c: (c.train(c.tmp / 'w', '--config.mesh.data=2'), c.tmp / 'w'),
     ['mesh data*fsdp*tensor = 2*1*1 = 2 but there are 1 devices', 'set mesh.* so the product is 1']),
    ('mesh_num_devices', lambda c: (c.train(c.tmp / 'w', '--config.mesh.num_devices=4'), c.tmp / 'w'),
     ['mesh.num_devices=4: there are 1 devices', 'use 1..1 or -1']),
    ('mesh_unknown_rules', lambda c: (c.train(c.tmp / 'w', '--config.mesh.rules=zero3'), c.tmp / 'w'),
     ["mesh.rules='zero3' is not one of auto, dp"]),
    ('mesh_custom_rule_axis', lambda c: (c.train(c.tmp / 'w', "--config.mesh.custom_rules=(('mlp','model'),)"),
                                         c.tmp / 'w'), ["mesh.custom_rules: 'model' is not a mesh axis"]),
    # -- train.init_from (pretrain, then fine-tune): the source run and the new workdir stay as they were
    ('init_from_no_run', lambda c: (c.train(c.tmp / 'w', f'--config.train.init_from={_mkdir(c.tmp / "e")}'), c.tmp),
     ['train.init_from=', 'holds no flaxformer_lite run (config.json missing)']),
    ('init_from_other_family', lambda c: (c.train(c.tmp / 'w', '--config.model.name=lstm',
                                                  f'--config.train.init_from={c.run()}'), c.tmp),
     ['is a transformer run and this one is model.name=lstm']),
    ('init_exclude_matches_nothing', lambda c: (c.train(c.tmp / 'w', f'--config.train.init_from={c.run()}',
                                                        '--config.train.init_exclude=heads'), c.tmp),
     ["train.init_exclude: 'heads' matches no parameter of this model"]),
    ('init_require_shape_mismatch', lambda c: (c.train(c.tmp / 'w', f'--config.train.init_from={c.run()}',
                                                       '--config.model.d_ff=32', '--config.train.init_require=decoder'),
                                               c.tmp), ['train.init_require: decoder/layer_0/mlp', 'cannot load']),
    ('init_step_missing', lambda c: (c.train(c.tmp / 'w', f'--config.train.init_from={c.run()}',
                                             '--config.train.init_step=7'), c.tmp),
     ['train.init_step=7:', 'has checkpoints at steps 10, 5']),
    ('init_map_names_nothing', lambda c: (c.train(c.tmp / 'w', f'--config.train.init_from={c.run()}',
                                                  '--config.train.init_map=encoder:decoder'), c.tmp),
     ["train.init_map: 'encoder' names no parameter of the train.init_from run"]),
    ('init_step_without_init_from', lambda c: (c.train(c.tmp / 'w', '--config.train.init_step=5'), c.tmp),
     ['train.init_step needs train.init_from=DIR']),
    ('freeze_matches_nothing', lambda c: (c.train(c.tmp / 'w', '--config.train.freeze=decoderr'), c.tmp),
     ["train.freeze: 'decoderr' matches no parameter of this model"]),
    ('generate_unknown_token', lambda c: (['--generate', f'--workdir={c.run()}', '--prompt=k1 zz'], c.tmp / 'run'),
     ["--prompt: 'zz' is not a token of task recall"]),
    # -- --eval_only and --report
    ('eval_only_empty_workdir', lambda c: (['--eval_only', f'--workdir={_mkdir(c.tmp / "e")}'], c.tmp / 'e'),
     ['holds no run (config.json missing)']),
    ('eval_only_missing_workdir', lambda c: (['--eval_only', f'--workdir={c.tmp / "gone"}'], c.tmp / 'gone'),
     ['--workdir=', 'gone holds no run', 'give the workdir of a trained run']),
    ('eval_only_without_checkpoint', lambda c: (['--eval_only', '--workdir=' + str(_run(c, _drop_checkpoints))],
                                                c.tmp / 'run'), ['--eval_only', 'holds no checkpoint yet']),
    ('eval_only_other_model', lambda c: (['--eval_only', f'--workdir={c.run()}', '--config.model.d_model=64'],
                                         c.tmp / 'run'), ['holds a run with model.d_model=32, not 64']),
    ('eval_only_damaged_config', lambda c: (['--eval_only', '--workdir=' + str(_run(c, _truncate_config))],
                                            c.tmp / 'run'), ['config.json is damaged']),
    ('report_not_a_directory', lambda c: (['--report', f'--workdir={c.file("r.txt", "")}'], c.tmp / 'r.txt'),
     ['--report: --workdir=', 'is not a directory', 'give sweep or run workdirs']),
    ('report_nothing_there', lambda c: (['--report', f'--workdir={_mkdir(c.tmp / "e")}'], c.tmp / 'e'),
     ['holds no runs']),
    # -- sweeps
    ('sweep_unknown_field', lambda c: (c.sweep_run("[{'model.nam': 'lstm'}]"), c.tmp / 's'),
     ["unknown config field 'model.nam'", "did you mean 'model.name'?"]),
    ('sweep_wrong_type', lambda c: (c.sweep_run("[{'train.batch_size': 'big'}]"), c.tmp / 's'),
     ["config field train.batch_size='big'"]),
    ('sweep_empty', lambda c: (c.sweep_run('[]'), c.tmp / 's'),
     ['returned no trials']),
    ('sweep_budget_and_steps', lambda c: (c.sweep_run("[{'train.tokens': 1e6}]"), c.tmp / 's'),
     ['train.steps=5 and train.tokens=1e+06 both set the length of the run']),
    ('sweep_duplicate_trials', lambda c: (c.sweep_run("[{'train.seed': 1}, {'train.seed': 1}]"), c.tmp / 's'),
     ['trials 0 and 1 are the same', 'each trial must differ']),
    ('sweep_zip_lengths', lambda c: (c.sweep_run("sweep.zip({'train.seed': [1, 2]}, {'model.name': ['lstm']})"),
                                     c.tmp / 's'), ['one length']),
    ('trial_out_of_range', lambda c: (c.sweep_run('sweep.seeds(2)', '--trial=2'), c.tmp / 's'),
     ['--trial=2 is out of range: the sweep has trials 0..1']),
    ('sweep_json_damaged', lambda c: ([f'--config={c.sweep("sweep.seeds(2)", "recorded.py")}', '--sweep',
                                       '--workdir=' + str(_recorded_sweep(c, _truncate_sweep_json))],
                                      c.tmp / 'sw'), ['cannot read sweep.json', 'it is damaged']),
    ('sweep_definition_changed', lambda c: ([f'--config={c.sweep("sweep.seeds(1)", "changed.py")}', '--sweep',
                                             f'--workdir={_recorded_sweep(c)}'], c.tmp / 'sw'),
     ['the sweep definition changed: trial 1 (seed=1) is no longer in it', 'trials may only be added']),
    ('sweep_overrides_changed', lambda c: ([f'--config={c.sweep("sweep.seeds(2)", "recorded.py")}', '--sweep',
                                            f'--workdir={_recorded_sweep(c)}', '--config.train.steps=7'], c.tmp / 'sw'),
     ['--config overrides', 'give the same overrides or choose a new --workdir']),
    ('sweep_workdir_of_something_else', lambda c: (c.sweep_run('sweep.seeds(2)') if _mkdir(c.tmp / 's', 'x') else None,
                                                   c.tmp / 's'),
     ['holds no sweep (sweep.json missing)']),
    ('sweep_in_use', lambda c: ([f'--config={c.sweep("sweep.seeds(2)", "recorded.py")}', '--sweep',
                                 f'--workdir={_recorded_sweep(c, _live_lock)}'], c.tmp / 'sw'),
     ['is in use by pid 31337 on host gpu-node-7']),
    ('slurm_args_not_options', lambda c: (c.sweep_run('sweep.seeds(2)', '--slurm=write', '--slurm_args=gpu'),
                                          c.tmp / 's'),
     ["--slurm_args: 'gpu' is not an sbatch option", 'write them as --name=value']),
    # -- the parametrisation (optim.parametrization, optim.base_width)
    ('parametrization_unknown', lambda c: (c.train(c.tmp / 'w', '--config.optim.parametrization=mu'), c.tmp / 'w'),
     ["config field optim.parametrization='mu' is not one of sp, mup", "did you mean 'mup'?"]),
    ('mup_without_base_width', lambda c: (c.train(c.tmp / 'w', '--config.optim.parametrization=mup'), c.tmp / 'w'),
     ['optim.parametrization=mup needs optim.base_width', 'set it to the width the learning rate was tuned at']),
    ('base_width_not_positive', lambda c: (c.train(c.tmp / 'w', '--config.optim.parametrization=mup',
                                                   '--config.optim.base_width=0'), c.tmp / 'w'),
     ['config field optim.base_width=0 must be a positive integer']),
    ('base_width_above_the_width', lambda c: (c.train(c.tmp / 'w', '--config.optim.parametrization=mup',
                                                      '--config.optim.base_width=64'), c.tmp / 'w'),
     ['optim.base_width=64 is larger than the width of this model (model.d_model=32)', 'use a base width <= 32']),
]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, compilation_cache):
    """One finished tiny run (checkpoints 5 and 10, results.json) that cases copy."""
    workdir = tmp_path_factory.mktemp('trained') / 'run'
    assert cli.main([f'--config={RECALL}', f'--workdir={workdir}', *FLAGS, '--quiet']) == 0
    return workdir


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_exit_2_and_leaves_the_workdir_as_it_was(case, tmp_path, trained, capsys,
                                                                         monkeypatch):
    name, setup, says = case
    monkeypatch.chdir(ROOT)
    argv, workdir = setup(Ctx(tmp_path, trained))
    before = tree_snapshot(workdir) if workdir is not None else None
    capsys.readouterr()
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.err.startswith('error: ') and out.err.count('\n') == 1, out.err
    assert 'Traceback' not in out.err + out.out
    for part in says:
        assert part in out.err, (part, out.err)
    if workdir is not None:
        assert tree_snapshot(workdir) == before, name


def test_the_catalogue_is_long():
    assert len(CASES) >= 40


@pytest.mark.parametrize('argv,says', [
    (['--config=configs/recall.py:quick', '--config.train.stepz=5'],
     "error: unknown config field 'train.stepz'; did you mean 'train.steps'?"),
    (['--config=configs/recall.py', '--wrkdir=x'], "error: unknown flag '--wrkdir=x'; did you mean --workdir?"),
], ids=['config_field', 'flag'])
def test_as_a_process_the_shell_sees_status_2_and_one_line(tmp_path, argv, says):
    workdir = tmp_path / 'w'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *argv, f'--workdir={workdir}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == says + '\n' and proc.stdout == ''
    assert not workdir.exists()
