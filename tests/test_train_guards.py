"""The run's guards on one process: the non-finite check names the bad step, value and
last checkpoint (train/guards.py); the shell's hooks (runtime/hooks.py): a stop signal is
one request even when delivered twice, a second different one stops at once, lock and
resume decisions pass straight through; the core's default hooks hold nothing and never
stop. (NaN/Inf and signals in a real run: test_reliability.py; several processes:
test_reliability_multihost.py.)"""

import os
import signal

import pytest

from flaxformer_lite.runtime import hooks as shell, lock as lock_lib
from flaxformer_lite.train import guards
from flaxformer_lite.train.hooks import RunHooks
from flaxformer_lite.train.step import GRADS_BAD, LOSS_BAD


class _Checkpoints:
    def __init__(self, latest):
        self.latest, self.waited = latest, False

    def wait(self):
        self.waited = True

    def latest_step(self):
        return self.latest


def _health(first_bad=-1, bad_what=0, skipped=0):
    return {'first_bad': first_bad, 'bad_what': bad_what, 'skipped': skipped}


def test_a_healthy_run_gives_its_skipped_count():
    ckpt = _Checkpoints(latest=5)
    assert guards.check_health(_health(skipped=2), ckpt) == 2
    assert not ckpt.waited


@pytest.mark.parametrize('what, metrics, latest, expected', [
    (LOSS_BAD | GRADS_BAD, {'objective': float('nan'), 'grad_norm': float('nan')}, 5,
     'train/loss is NaN (and so are the gradients) at step 7; the run stopped without saving a bad state '
     '(the last checkpoint, step 5, is intact)'),
    (GRADS_BAD, {'objective': 1.0, 'grad_norm': float('-inf')}, None,
     'the gradients are -Inf (train/grad_norm) at step 7; the run stopped without saving a bad state '
     '(no checkpoint was written)'),
])
def test_a_bad_step_is_named_with_its_value_and_the_last_checkpoint(what, metrics, latest, expected):
    ckpt = _Checkpoints(latest)
    pending = [(6, {'objective': 1.0, 'grad_norm': 1.0}), (7, metrics)]
    with pytest.raises(guards.NonFiniteError) as e:
        guards.check_health(_health(first_bad=7, bad_what=what), ckpt, pending)
    assert str(e.value).startswith(expected) and ckpt.waited
    assert guards.NonFiniteError.exit_status == 3


def test_a_bad_step_not_among_the_fetched_metrics_is_not_finite():
    with pytest.raises(guards.NonFiniteError, match='train/loss is not finite at step 3'):
        guards.check_health(_health(first_bad=3, bad_what=LOSS_BAD), _Checkpoints(None))


def test_a_signal_is_one_request_even_twice_and_another_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with shell.shell_hooks().stop_requests() as stop:
        assert not stop.requested(1, every=10)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same request delivered twice
        assert stop.requested(1, every=10) and stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before


def test_one_process_takes_the_lock_itself_and_keeps_its_resume_decision(tmp_path):
    assert guards.agreed(True) is True and guards.agreed(False) is False
    hooks = shell.shell_hooks()
    held = hooks.claim(str(tmp_path / 'run'))
    assert lock_lib.holder(str(tmp_path / 'run'))['pid'] == os.getpid() and held.lost is None
    hooks.check_free(str(tmp_path / 'run'))  # this process's own lock is no refusal
    held.lock.lost = {'pid': 7, 'host': 'h', 'since': 's', 'kind': 'training'}  # what the heartbeat records
    assert held.lost == 'pid 7 on host h since s (training)'
    held.release()
    assert lock_lib.holder(str(tmp_path / 'run')) is None


def test_the_cores_default_hooks_hold_nothing_and_never_stop(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    hooks = RunHooks()
    hooks.check_free(str(tmp_path))
    held = hooks.claim(str(tmp_path / 'run'))
    assert held.lost is None and not (tmp_path / 'run').exists()
    held.release(undo=True)
    with hooks.stop_requests() as stop:
        assert signal.getsignal(signal.SIGTERM) == before
        assert not stop.requested(10, every=10) and stop.signal is None
