"""A run that kills itself with SIGKILL where a test says (`Zygote` in conftest.py starts
it through the package's fork server): `run([PLAN_JSON, *launch_argv])`.

Plans: after_seconds, at_step, in_save (the async save of a step dispatched, then a
delay), in_test_eval, before_results, mid_results (the temporary file written, not yet
renamed); `cpus` pins the child to those CPUs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from flaxformer_lite import cli, tracking
from flaxformer_lite.train import checkpoint, evaluate, results


def die() -> None:
    sys.stderr.write('fault injection: killing this run now\n')
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(plan: dict) -> None:
    kind = plan.get('kind')
    if kind == 'after_seconds':
        threading.Timer(plan['seconds'], die).start()
    elif kind == 'at_step':
        update = tracking.Progress.update

        def at(self, step):
            update(self, step)
            if step == plan['step']:
                die()
        tracking.Progress.update = at
    elif kind == 'in_save':
        save = checkpoint.Checkpointer.save

        def saving(self, step, *a, **k):
            save(self, step, *a, **k)
            if step == plan['step']:
                time.sleep(plan.get('delay', 0.0))
                die()
        checkpoint.Checkpointer.save = saving
    elif kind == 'in_test_eval':
        call = evaluate.Evaluator.__call__

        def evaluating(self, params, split='eval'):
            if split == 'test':
                die()
            return call(self, params, split)
        evaluate.Evaluator.__call__ = evaluating
    elif kind == 'before_results':
        def writing(workdir, record):
            die()
        results.write = writing
    elif kind == 'mid_results':
        def writing(workdir, record):
            with open(os.path.join(workdir, results.RESULTS_FILE) + '.tmp', 'w') as f:
                json.dump(record, f)
            die()
        results.write = writing


def run(argv: list[str]) -> int:
    install(json.loads(argv[0]))
    return cli.main(argv[1:])
