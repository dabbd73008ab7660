"""What a run computes is pinned: one short run per model family and shape (through the
command line, config files and overrides included) and the trial lists of two sweeps must
give the values recorded in tests/pinned/behaviour.json: the first 20 logged training
losses and the final test metrics of each run, and each sweep's trial folders and fields.
Code may move between files; these numbers may not.

On the machine and jax build that recorded them the comparison is exact (bit for bit);
elsewhere (another CPU's vector width can reorder a reduction) it allows a relative 1e-4.
To record again after a deliberate change of behaviour, run

    FLAXFORMER_RECORD_PINNED=1 python3 -m pytest -q -p no:xdist tests/test_pinned_behaviour.py

and say in the commit what moved and why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform

import pytest

from flaxformer_lite import cli
from flaxformer_lite.sweep import plan
from flaxformer_lite.train import results

from conftest import ROOT, read_scalars

pytestmark = pytest.mark.slow  # 28 short training runs

PINNED = os.path.join(ROOT, 'tests', 'pinned', 'behaviour.json')
RECORD = os.environ.get('FLAXFORMER_RECORD_PINNED') == '1'
SHORT = ['--config.model.size=micro', '--config.train.steps=20', '--config.train.log_every=1',
         '--config.train.batch_size=8', '--config.eval.every_steps=20', '--config.eval.num_examples=16',
         '--config.checkpoint.every_steps=20', '--config.optim.warmup_steps=4', '--quiet']
FAMILIES = ('transformer', 'lstm', 'gru', 'rnn', 'linear_attention', 'mamba', 'mingru')
RUNS = {
    # decoder_only: a language-model task
    **{f'decoder_only-{f}': ['--config=configs/recall.py', f'--config.model.name={f}'] for f in FAMILIES},
    # encoder_classifier: a classification task
    **{f'encoder_classifier-{f}': ['--config=configs/agreement.py:quick', '--config.task.mode=classify',
                                   f'--config.model.name={f}'] for f in FAMILIES},
    # decoder_classifier: a causal stack pooled at the last token (what a pretrained LM fine-tunes into)
    **{f'decoder_classifier-{f}': ['--config=configs/listops.py:quick', f'--config.model.name={f}',
                                   '--config.model.arch=decoder_classifier', '--config.model.pooling=last']
       for f in FAMILIES},
    # encoder_decoder: the families that have one
    **{f'encoder_decoder-{f}': ['--config=configs/seq2seq.py:quick', f'--config.model.name={f}']
       for f in ('transformer', 'lstm', 'gru', 'rnn')},
    'encoder_decoder-gru_bahdanau': ['--config=configs/seq2seq.py:quick', '--config.model.name=gru',
                                     '--config.model.rnn_attention=bahdanau', '--config.model.bidirectional=true'],
    # encoder_mlm: masked bytes
    'encoder_mlm-transformer': ['--config=configs/text_lm.py:quick', '--config.task.objective=mlm',
                                '--config.task.seq_len=32'],
    # the original Transformer's options: post-norm, sinusoidal positions, shared embeddings
    'decoder_only-transformer_vaswani': ['--config=configs/recall.py', '--config.model.name=transformer',
                                         '--config.model.norm_position=post', '--config.model.pos_encoding=sinusoidal'],
}
SWEEPS = {
    'long_range_quick_tune': ('experiments/long_range.py:quick', 'tune'),
    'lr_transfer_quick': ('experiments/lr_transfer.py:quick', 'main'),
}


def machine() -> str:
    """What decides the bits: the jax build and the CPU's instruction set."""
    import jax
    import jaxlib
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        pass
    cpu = hashlib.sha256(' '.join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f'jax {jax.__version__} jaxlib {jaxlib.__version__} {platform.machine()} cpu {cpu}'


def _pinned() -> dict:
    if RECORD and not os.path.exists(PINNED):
        return {'machine': machine(), 'runs': {}, 'sweeps': {}}
    with open(PINNED) as f:
        return json.load(f)


def _record(section: str, name: str, value) -> None:
    pinned = _pinned()
    pinned['machine'] = machine()
    pinned[section][name] = value
    os.makedirs(os.path.dirname(PINNED), exist_ok=True)
    with open(PINNED, 'w') as f:
        json.dump(pinned, f, indent=1, sort_keys=True)
        f.write('\n')


def _same(now: float, then: float, exact: bool) -> bool:
    if exact or not (math.isfinite(now) and math.isfinite(then)):
        return now == then or (math.isnan(now) and math.isnan(then))
    return abs(now - then) <= 1e-4 * max(abs(then), 1e-6)


@pytest.mark.parametrize('name', sorted(RUNS))
def test_a_short_run_computes_what_it_did(name, tmp_path, capsys):
    workdir = str(tmp_path / 'run')
    rc = cli.main([*RUNS[name], *SHORT, f'--workdir={workdir}'])
    assert rc == 0, capsys.readouterr().err[-3000:]
    losses = read_scalars(workdir)['train/loss']
    now = {'losses': [float(losses[s]) for s in sorted(losses)][:20],
           'test': {k: float(v) for k, v in sorted(results.read(workdir)['metrics'].items())
                    if k.startswith('test/')}}
    assert len(now['losses']) == 20 and now['test']
    if RECORD:
        _record('runs', name, now)
        return
    pinned = _pinned()
    assert name in pinned['runs'], f'{name} was never recorded; see this file\'s docstring'
    then, exact = pinned['runs'][name], pinned['machine'] == machine()
    moved = [f'loss at step {i + 1}: {a!r} != {b!r}' for i, (a, b) in enumerate(zip(now['losses'], then['losses']))
             if not _same(a, b, exact)]
    moved += [f'{k}: {now["test"].get(k)!r} != {v!r}' for k, v in then['test'].items()
              if k not in now['test'] or not _same(now['test'][k], v, exact)]
    assert sorted(now['test']) == sorted(then['test']) and not moved, moved[:5]


@pytest.mark.parametrize('name', sorted(SWEEPS))
def test_a_sweep_lists_the_trials_it_did(name, tmp_path):
    config, stage = SWEEPS[name]
    trials = plan.load(config, {}, str(tmp_path / 'sweep'), stage=stage).trials
    now = [{'dir': t.dir, 'overrides': {k: v for k, v in sorted(t.overrides.items())}} for t in trials]
    now = json.loads(json.dumps(now, default=list))
    assert now
    if RECORD:
        _record('sweeps', name, now)
        return
    assert now == _pinned()['sweeps'][name]
