"""The supervisor's view of a multi-host child's stderr (supervisor.StderrFilter): a
Python traceback the dead peer caused just before jax.distributed's abort belongs to the
one-line failure; any other traceback is shown, in its place, and nothing is lost."""

from flaxformer_lite.runtime.supervisor import StderrFilter

TRACEBACK = ['Exception in thread Thread-3 (_save):', 'Traceback (most recent call last):',
             '  File "x.py", line 1, in f', 'XlaRuntimeError: barrier failed: task 1 unavailable']
FATAL = 'E1203 10:00:00 coordination_service_agent.cc:1] Terminating process because the JAX distributed service'


def _run(timeline, code, grace=10.0):
    """Feed (time, line) pairs (line None: a quiet moment, a tick); -> (written, failure)."""
    f, written = StderrFilter(grace), []
    for now, line in timeline:
        written += f.tick(now) if line is None else f.feed(line + '\n', now)
    rest, failure = f.end(code)
    return written + rest, failure


def test_lines_pass_through_as_they_come():
    f = StderrFilter()
    assert f.feed('step 1/10 loss 2.3\n', 0.0) == ['step 1/10 loss 2.3']
    assert f.end(0) == ([], None)


def test_a_traceback_followed_by_the_abort_is_part_of_the_failure():
    timeline = [(0.0, 'step 20/160')] + [(1.0, x) for x in TRACEBACK] + [(2.0, FATAL), (2.1, 'more C++ trace')]
    written, failure = _run(timeline, code=-6)
    assert written == ['step 20/160']
    assert failure == TRACEBACK + [FATAL, 'more C++ trace']


def test_a_traceback_without_an_abort_is_shown_once_its_wait_is_over():
    timeline = [(0.0, x) for x in TRACEBACK] + [(5.0, 'step 21/160'), (11.0, None), (12.0, 'step 22/160')]
    f, seen = StderrFilter(10.0), []
    for now, line in timeline:
        out = f.tick(now) if line is None else f.feed(line, now)
        seen.append(out)
    assert seen[:5] == [[], [], [], [], []]  # held: an abort may follow
    assert seen[5] == TRACEBACK + ['step 21/160']  # the wait is over: in order, nothing lost
    assert seen[6] == ['step 22/160']
    assert f.end(0) == ([], None)


def test_a_traceback_at_the_end_of_a_failing_child_is_shown():
    written, failure = _run([(0.0, 'step 1/10')] + [(1.0, x) for x in TRACEBACK], code=1)
    assert written == ['step 1/10'] + TRACEBACK and failure is None


def test_fatal_lines_from_a_child_that_then_succeeds_are_shown():
    written, failure = _run([(0.0, FATAL), (0.5, 'done')], code=0)
    assert written == [FATAL, 'done'] and failure is None
