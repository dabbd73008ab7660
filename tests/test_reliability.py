"""Nothing lost under kills: kill -9 at random moments and in every phase (before the
first checkpoint, inside an async save, during the final evaluation and results.json),
then the same command, ends bit-identical to an uninterrupted run with a TensorBoard
history that has every step once; one writer per workdir (a second one refused at once,
a killed one's lock taken over, readers never refused); damaged checkpoints reported and
skipped, never a silent fresh start.

Runs are real processes killed with SIGKILL, forked from a `Zygote` that imported jax
once (conftest.py), so a kill and restart costs the run, not the imports."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import (ROOT, TINY_MODEL, TINY_RECALL, assert_same_tree, compilation_cache, event_history,  # noqa: F401
                      restore_state, tree_snapshot, zygote)  # noqa: F401  (compilation_cache, zygote: fixtures)

from flaxformer_lite import cli
from flaxformer_lite import config as config_lib
from flaxformer_lite.runtime import lock as lock_lib
from flaxformer_lite.train import checkpoint

pytestmark = [pytest.mark.slow,  # kills runs at random moments and resumes them
              pytest.mark.xdist_group('reliability')]  # the uninterrupted run, trained once

SPEC = 'configs/recall.py'
RUN = {**TINY_RECALL, **TINY_MODEL, 'train.batch_size': 16, 'train.log_every': 5, 'eval.every_steps': 10,
       'eval.num_examples': 32, 'optim.warmup_steps': 5, 'optim.learning_rate': 3e-3, 'model.dropout': 0.1}
TIMING = ('train/tokens_per_sec', 'train/mfu')  # measurements, not history: their values differ run to run


def _args(workdir, **fields):
    overrides = {**RUN, **{k.replace('__', '.'): v for k, v in fields.items()}}
    return [f'--config={SPEC}', f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in overrides.items())]


def _cfg(**fields):
    return config_lib.load(os.path.join(ROOT, SPEC), {k: str(v) for k, v in
                                                     {**RUN, **{k.replace('__', '.'): v for k, v in fields.items()}}.items()})


def _complete_steps(workdir):
    return checkpoint.steps_saved(workdir)


def _compare_histories(ref, got):
    """Same tags, each step once, the same steps as the uninterrupted run, the same values
    (train/eval/test: bit for bit). Timing scalars: no step twice, none outside the log steps."""
    ref_tags = {t for t in ref if not t.startswith('_hparams_')}
    assert ref_tags == {t for t in got if not t.startswith('_hparams_')}
    for tag in sorted(ref_tags):
        steps = [s for s, _ in got[tag]]
        assert len(steps) == len(set(steps)), (tag, steps)  # no step twice
        if tag in TIMING:
            assert set(steps) <= {s for s, _ in ref['train/loss']}, (tag, steps)
            continue
        assert steps == [s for s, _ in ref[tag]], (tag, steps)  # none missing
        assert got[tag] == ref[tag], tag
    for tag in [t for t in got if t.startswith('_hparams_')]:
        assert len(got[tag]) == 1, tag  # declared once, not on every restart


# The run most tests compare with: 60 steps, a checkpoint every 10, saved asynchronously.
STRAIGHT = dict(train__steps=60, optim__decay_steps=60, checkpoint__every_steps=10, checkpoint__max_to_keep=3,
                checkpoint__async_save=True)


@pytest.fixture(scope='module')
def straight(zygote, tmp_path_factory):
    """The uninterrupted run, once per module: (workdir, its final state, its history)."""
    workdir = tmp_path_factory.mktemp('straight') / 'run'
    assert zygote.run(_args(workdir, **STRAIGHT), workdir.parent / 'log') == 0
    return workdir, restore_state(str(workdir), _cfg(**STRAIGHT)), event_history(str(workdir))


def test_kill_9_at_random_moments_and_in_every_phase_ends_as_an_uninterrupted_run(zygote, straight, tmp_path):
    steps, every = STRAIGHT['train__steps'], STRAIGHT['checkpoint__every_steps']
    rng = random.Random(13)
    # Every start but the last is killed with SIGKILL where its plan says (random steps
    # and times, and the phases a kill must survive); `s` is the newest complete step.
    plans = [
        # Before the first checkpoint, in a start that evaluates (and so flushes events)
        # at step 5 too: TensorBoard must not show the dead start's step 5.
        lambda s: {'kind': 'at_step', 'step': rng.randint(6, every - 1), 'argv': ['--config.eval.every_steps=5']},
        lambda s: {'kind': 'in_save', 'step': s + every, 'delay': 0.0},  # while an async save writes
        lambda s: {'kind': 'after_seconds', 'seconds': rng.uniform(0.2, 1.0)},  # start-up, restore, compile
        lambda s: {'kind': 'at_step', 'step': rng.randint(s + 1, steps - 1)},  # anywhere in training
        lambda s: {'kind': 'in_save', 'step': steps, 'delay': rng.uniform(0.0, 0.05)},  # the final checkpoint
        lambda s: {'kind': 'in_test_eval'},  # the last checkpoint is written: the test split
        lambda s: {'kind': 'mid_results'},  # test scalars logged; results.json.tmp written, not renamed
    ]
    workdir = tmp_path / 'killed'
    landed, tmp_left = [], 0
    for i, make in enumerate(plans + [None]):
        before = _complete_steps(workdir)
        tmp_left += (workdir / 'checkpoints').exists() and any('tmp' in n for n in os.listdir(workdir / 'checkpoints'))
        plan = make(before[0] if before else 0) if make else None
        log = tmp_path / f'start{i}.log'
        code = zygote.run(_args(workdir, **STRAIGHT) + (plan or {}).get('argv', []), log, plan)
        text = log.read_text()
        assert code == (0 if plan is None else -9), (i, plan, code, text[-3000:])
        if i == 0:  # what TensorBoard must not show in the end
            shutil.copytree(workdir, tmp_path / 'first')
        resumed = re.findall(r'resumed from step (\d+) in', text)
        if before and (resumed or code == 0):  # (a kill during start-up may come before the restore)
            assert resumed == [str(before[0])], (i, before, text[-2000:])  # the newest complete checkpoint
        else:
            assert not resumed, (i, text[-2000:])
        if plan:
            landed.append((plan['kind'], plan.get('step', plan.get('seconds')), before[0] if before else None))
    assert 'eval/loss' in event_history(str(tmp_path / 'first'))  # (the first start's events, kept aside)
    assert tmp_left >= 1  # a kill did land inside an async save (its *-tmp folder was left)
    assert not any('tmp' in n for n in os.listdir(workdir / 'checkpoints'))  # and the next start removed it
    assert not (workdir / lock_lib.LOCK_FILE).exists()
    ref, ref_state, ref_history = straight
    assert_same_tree(restore_state(str(workdir), _cfg(**STRAIGHT)), ref_state)  # bit for bit
    a, b = json.loads((ref / 'results.json').read_text()), json.loads((workdir / 'results.json').read_text())
    assert a['metrics'] == b['metrics'] and a['best'] == b['best'] and a['step'] == b['step'] == steps
    _compare_histories(ref_history, event_history(str(workdir)))
    print(f'{len(landed)} kills survived (kind, where, resumed from): {landed}')


def _wait_for(predicate, timeout=120, what=''):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f'timed out waiting for {what}')


def test_one_writer_per_workdir_readers_never_refused_and_a_killed_writers_lock_taken_over(zygote, tmp_path, capsys,
                                                                                          compilation_cache):
    workdir = tmp_path / 'run'
    fields = {**STRAIGHT, 'train__steps': 100000, 'checkpoint__every_steps': 5, 'train__log_every': 1,
              'eval__every_steps': 1000}
    pid = zygote.start(_args(workdir, **fields), tmp_path / 'writer.log')
    _wait_for(lambda: len(_complete_steps(workdir)) >= 2, what='two checkpoints')
    record = json.loads((workdir / 'lock.json').read_text())
    assert record['pid'] == pid and record['host'] == socket.gethostname()
    # A second training: refused at once, naming the writer; nothing written by it.
    started = time.time()
    assert cli.main(_args(workdir, **fields)) == 2
    err = capsys.readouterr().err
    assert time.time() - started < 5, 'refused before building anything'
    assert err.count('\n') == 1 and f'is in use by pid {pid} on host {socket.gethostname()} since ' in err, err
    assert record['since'] in err
    # A reader: --eval_only restores the newest complete checkpoint while the writer
    # writes (and leaves results.json to it). (--report: tests/test_reliability_sweep.py.)
    assert cli.main(['--eval_only', f'--workdir={workdir}']) == 0
    out = capsys.readouterr()
    assert 'is being written by pid' in out.err and 'test/accuracy' in out.out
    assert not (workdir / 'results.json').exists()  # left to the writer
    # kill -9: the lock stays behind, names a dead pid, and the next run takes it over.
    os.kill(pid, 9)
    assert zygote.wait(pid) == -9
    assert json.loads((workdir / 'lock.json').read_text())['pid'] == pid
    last = _complete_steps(workdir)[0]
    log = tmp_path / 'rerun.log'
    assert zygote.run(_args(workdir, **{**fields, 'train__steps': last + 3}), log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f'took over the lock of pid {pid} on host' in text and 'that process' in text
    assert f'resumed from step {last} in' in text and not (workdir / 'lock.json').exists()


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, capsys):
    workdir = tmp_path / 'w'
    workdir.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    here = socket.gethostname()
    fresh_other = {'host': 'other-host.example', 'pid': 4242, 'since': '2030-01-01T00:00:00', 'kind': 'training',
                   'heartbeat': time.time(), 'token': 'x'}
    cases = [  # (lock record, taken over?)
        ({'host': here, 'pid': dead.pid, 'since': 's', 'token': 'a'}, True),  # dead pid on this host
        ({'host': here, 'pid': os.getppid(), 'since': 's', 'token': 'b', 'pid_start': '1'}, True),  # pid reused
        ({**fresh_other, 'heartbeat': time.time() - 2 * lock_lib.STALE_S}, True),  # old heartbeat elsewhere
        ({'host': here, 'pid': os.getppid(), 'since': 's', 'token': 'c',
          'pid_start': lock_lib._proc_start(os.getppid())[1]}, False),  # noqa: SLF001  a live process here
        (fresh_other, False),  # a fresh heartbeat elsewhere
    ]
    for record, stale in cases:
        (workdir / 'lock.json').write_text(json.dumps(record))
        if stale:
            held = lock_lib.acquire(str(workdir))
            assert 'took over the lock' in capsys.readouterr().err
            assert json.loads((workdir / 'lock.json').read_text())['pid'] == os.getpid()
            held.release()
            assert not (workdir / 'lock.json').exists()
        else:
            with pytest.raises(lock_lib.UserError, match=f"is in use by pid {record['pid']} on host {record['host']}"):
                lock_lib.acquire(str(workdir))
            assert json.loads((workdir / 'lock.json').read_text()) == record
    (workdir / 'lock.json').write_text('{"host": "trunc')  # a damaged lock file is stale too
    lock_lib.acquire(str(workdir)).release()


def _truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(int(size * fraction))


def _biggest_file(folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
    return max(files, key=os.path.getsize)


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(zygote, straight, tmp_path, capsys,
                                                                           compilation_cache):
    """A truncated file, then a deleted one, in the newest step: one warning naming it,
    resumed from the step before, and the end is still bit-identical to a straight run.
    --eval_only falls back the same way and moves nothing."""
    workdir = tmp_path / 'run'
    assert zygote.run(_args(workdir, **{**STRAIGHT, 'train__steps': 30}), tmp_path / 'a.log') == 0
    _truncate(_biggest_file(workdir / 'checkpoints' / '30' / 'state'), 0.9)  # Orbax alone reads this one
    before = tree_snapshot(workdir)
    assert cli.main(['--eval_only', f'--workdir={workdir}', '--quiet']) == 0
    err = capsys.readouterr().err
    assert re.search(r'warning: checkpoint step 30 in \S+ is damaged \(state/\S+ is truncated', err), err
    assert tree_snapshot(workdir) == before  # a reader moves nothing, and results.json (of step 30) stays
    log = tmp_path / 'b.log'
    assert zygote.run(_args(workdir, **{**STRAIGHT, 'train__steps': 40}), log) == 0
    text = log.read_text()
    assert text.count('warning: checkpoint step 30') == 1 and 'using step 20 instead' in text
    assert 'resumed from step 20 in' in text and os.listdir(workdir / 'checkpoints_damaged')[0].startswith('30-')
    os.remove(workdir / 'checkpoints' / '40' / 'data' / 'process_0-of-1.json')  # a deleted file
    log = tmp_path / 'c.log'
    assert zygote.run(_args(workdir, **STRAIGHT), log) == 0
    text = log.read_text()
    assert 'warning: checkpoint step 40' in text and 'data/process_0-of-1.json is missing' in text
    assert 'resumed from step 30 in' in text
    assert_same_tree(restore_state(str(workdir), _cfg(**STRAIGHT)), straight[1])


def _poison(monkeypatch, bad_steps):
    """NaN weights in the batches of `bad_steps` (1-based): the loss and every gradient of
    those steps are NaN, the other steps untouched."""
    import numpy as np
    from flaxformer_lite import data
    dataset = data.train_dataset

    def poisoned(*args, **kwargs):
        def batch(i, b):
            return {**b, 'weights': np.full_like(b['weights'], np.nan)} if i + 1 in bad_steps else b
        return dataset(*args, **kwargs).map_with_index(batch)
    monkeypatch.setattr(data, 'train_dataset', poisoned)


def test_a_nan_loss_stops_the_run_without_saving_it_and_skip_nonfinite_skips_it(tmp_path, monkeypatch, capsys,
                                                                               compilation_cache):
    _poison(monkeypatch, {7})
    workdir = tmp_path / 'run'
    fields = dict(train__steps=20, checkpoint__every_steps=5, optim__decay_steps=60)
    assert cli.main(_args(workdir, **fields) + ['--quiet']) == 3
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: train/loss is NaN (and so are the gradients) at step 7;')
    assert 'the last checkpoint, step 5, is intact' in err and '--config.train.skip_nonfinite=True' in err
    assert _complete_steps(workdir) == [5] and not (workdir / 'results.json').exists()  # step 10 was never saved
    # Not a log step, but a checkpoint one: found before the save.
    other = tmp_path / 'other'
    assert cli.main(_args(other, **{**fields, 'checkpoint__every_steps': 8}) + ['--quiet',
                                                                               '--config.train.log_every=10']) == 3
    assert 'at step 7;' in capsys.readouterr().err and not _complete_steps(other)
    # The same command with train.skip_nonfinite=True goes on from step 5, past step 7.
    assert cli.main(_args(workdir, **fields, train__skip_nonfinite=True) + ['--quiet']) == 0
    results = json.loads((workdir / 'results.json').read_text())
    assert results['skipped_updates'] == 1 and results['status'] == 'done'
    assert [v for _, v in event_history(str(workdir))['train/skipped_updates']] == [1.0, 1.0, 1.0]  # steps 10-20
    capsys.readouterr()


def test_a_skipped_update_leaves_parameters_and_optimizer_state_as_they_were(tmp_path, monkeypatch, compilation_cache):
    _poison(monkeypatch, {7})
    workdir = tmp_path / 'run'
    assert cli.main(_args(workdir, train__steps=7, checkpoint__every_steps=6, train__skip_nonfinite=True,
                          optim__decay_steps=60) + ["--quiet"]) == 0
    cfg = _cfg(train__steps=7, train__skip_nonfinite=True, optim__decay_steps=60)
    six, seven = restore_state(str(workdir), cfg, 6), restore_state(str(workdir), cfg, 7)
    assert int(seven.step) == 7 and int(six.step) == 6
    assert_same_tree(seven.params, six.params)
    assert_same_tree(seven.opt_state, six.opt_state)
    assert json.loads((workdir / 'results.json').read_text())['skipped_updates'] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (we run as root in CI): a real full disk, then a read-only one."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1500k', 'tmpfs', str(mount)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.fail(f'cannot mount a tmpfs (needs root): {proc.stderr.strip()}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=False)


def test_a_full_then_read_only_disk_is_one_line_and_the_checkpoints_stay_resumable(small_disk, straight, capsys,
                                                                                   compilation_cache):
    fields = {**STRAIGHT, 'checkpoint__max_to_keep': 20}
    workdir = small_disk / 'run'
    assert cli.main(_args(workdir, **fields) + ['--quiet']) == 4
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err  # Orbax's own tracebacks of the failed writes are not shown
    kept = _complete_steps(workdir)
    assert re.fullmatch(rf'error: --workdir=\S+: its disk refused a write \(no space left on device\); the '
                        rf'checkpoints up to step {kept[0]} are intact: free space or make it writable, then run the '
                        rf'same command again to resume\n', err), err
    assert 10 <= kept[0] < 60
    # Made read-only: refused before anything, the workdir as it was; --eval_only still reads it.
    subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
    before = tree_snapshot(workdir)
    assert cli.main(_args(workdir, **fields) + ['--quiet']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'cannot be written (Read-only file system)' in err, err
    assert cli.main(['--eval_only', f'--workdir={workdir}', '--quiet']) == 0
    assert 'results.json not updated (read-only file system)' in capsys.readouterr().err
    assert tree_snapshot(workdir) == before
    # Space again: the run resumes from its last checkpoint and ends as if nothing happened.
    subprocess.run(['mount', '-o', 'remount,rw,size=16m', str(small_disk)], check=True)
    assert cli.main(_args(workdir, **fields)) == 0
    assert f'resumed from step {kept[0]} in' in capsys.readouterr().err
    assert_same_tree(restore_state(str(workdir), _cfg(**fields)), straight[1])
