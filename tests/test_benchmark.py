"""The benchmark harness on tiny configs: a well-formed table and JSON whose FLOPs are
accounting's (the ones tests/test_accounting.py checks against XLA). No timed assertions."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the benchmark run end to end

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import benchmark  # noqa: E402

from flaxformer_lite import accounting  # noqa: E402

TINY_SHAPE = {'model.num_layers': 1, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64,
              'task.seq_len': 16, 'train.batch_size': 2}


def _check_row(row, bench):
    exp = benchmark.experiment_of(bench, row['settings'])
    assert row['flops_per_example'] == exp.family.flops_per_example(exp.model_cfg, exp.spec)
    assert row['params'] == accounting.summary(exp)['params_total']
    for key in ('step_s', 'tokens_per_s', 'model_flops_per_s', 'ceiling_flops_per_s', 'mfu_ceiling'):
        assert row[key]['min'] > 0 and row[key]['min'] <= row[key]['median'] <= row[key]['max'], key
    assert row['compile_s'] > 0 and row['peak_memory_bytes'] > 0
    assert row['tokens_per_s']['max'] * row['step_s']['min'] == pytest.approx(row['batch'] * exp.tokens_per_example())


def test_table_and_json_of_tiny_configs(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    # The LSTM here; the Transformer below (one compile each keeps this fast).
    rows = benchmark.main(['--configs=tiny_lstm', '--rounds=2', '--steps=1', '--no_torch', '--in_process',
                           f'--out={out}'])
    printed = capsys.readouterr().out
    lines = printed[printed.index('| config |'):].strip().splitlines()
    assert lines[0] == '| ' + ' | '.join(benchmark.COLUMNS) + ' |' and len(lines) == 3
    assert lines[2].count('|') == len(benchmark.COLUMNS) + 1 and lines[2].startswith('| tiny_lstm |')
    data = json.loads(out.read_text())
    assert data['meta']['jax'] and data['rows'] == json.loads(json.dumps(rows))
    for row in data['rows']:
        _check_row(row, benchmark.CONFIGS[row['config']])
        assert 'ratio' not in row


def test_gpu_configs_python_part_on_a_tiny_shape():
    """gpu_benchmark.sh's configs (bfloat16, xla attention, scanned layers) at a tiny shape."""
    gpu = benchmark.CONFIGS['gpu1b']
    bench = dataclasses.replace(gpu, name='tiny_gpu', fields=tuple({**gpu.overrides(), **TINY_SHAPE}.items()))
    row = benchmark.run_config(bench, rounds=1, steps=1, use_torch=False, in_process=True)
    _check_row(row, bench)
    assert benchmark.table([row]).splitlines()[2].startswith('| tiny_gpu | transformer 1x32')
    assert row['dtype'] == 'bfloat16' and row['mfu_peak'] is None  # no datasheet peak for a CPU
    script = open(os.path.join(ROOT, 'experiments', 'gpu_benchmark.sh')).read()
    assert '--configs=gpu125m,gpu350m,gpu1b' in script
    subprocess.run(['bash', '-n', os.path.join(ROOT, 'experiments', 'gpu_benchmark.sh')], check=True)


def test_unknown_config_is_one_line():
    with pytest.raises(SystemExit, match='unknown nope'):
        benchmark.main(['--configs=nope'])
