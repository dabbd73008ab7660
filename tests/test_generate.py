"""`launch.py --generate`: temperature 0 is greedy decoding of the full model (no cache),
beam search of width 1 is greedy too, a model trained to copy writes the copy, and what
cannot be generated is one line with exit status 2."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, compilation_cache, tiny_config  # noqa: F401  (a fixture)

from flaxformer_lite import cli, resolve
from flaxformer_lite.errors import UserError
from flaxformer_lite.cli import generate
from flaxformer_lite.train import checkpoint
from flaxformer_lite.train.loop import train_and_evaluate
from flaxformer_lite.train.setup import build

pytestmark = pytest.mark.xdist_group('generate')  # the trained language models, once

FAST = dict(train__steps=10, eval__every_steps=10, checkpoint__every_steps=10, train__log_every=5,
            eval__num_examples=16, optim__learning_rate=1e-2)


def _full_pass_greedy(exp, workdir, prompt, n):
    """Greedy decoding by running the whole model on the growing sequence each step."""
    setup = build(exp)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, async_save=False, read_only=True)
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            _, state, _, _ = ckpt.restore_latest(setup.abstract_state)
            # One length for every step (one compilation): the model is causal, so what follows
            # position i (zeros not yet written) cannot change its logits.
            seq = np.zeros((1, len(prompt) + n), np.int32)
            seq[0, :len(prompt)] = prompt
            apply = jax.jit(lambda p, x: setup.model.apply({'params': p}, {'inputs': x}))
            for i in range(len(prompt), len(prompt) + n):
                seq[0, i] = int(np.argmax(np.asarray(apply(state.params, jnp.asarray(seq))[0, i - 1])))
    finally:
        ckpt.close()
    return list(seq[0, len(prompt):])


@pytest.fixture(scope='module')
def lm_runs(tmp_path_factory, compilation_cache):
    runs = {}
    for model in ('transformer', 'lstm'):
        exp = resolve.from_config(tiny_config('recall', model, **FAST))
        workdir = str(tmp_path_factory.mktemp('gen') / model)
        train_and_evaluate(exp, workdir, verbose=False)
        runs[model] = exp, workdir
    return runs


@pytest.mark.parametrize('model', ['transformer', 'lstm'])
def test_temperature_0_is_greedy_decoding_of_the_full_model_and_beam_1_is_too(model, lm_runs):
    exp, workdir = lm_runs[model]
    prompt_text, n = '^ k1 v2 k3 v0 . . k1', 20  # longer than the training sequences (16) in total
    prompt = exp.task.prompt_tokens(prompt_text)
    text, step = generate.generate(exp, workdir, prompt_text, generate.Options(max_new_tokens=n, temperature=0.0))
    assert step == 10
    tokens = list(exp.task.prompt_tokens(text))
    assert len(tokens) == n
    assert tokens == _full_pass_greedy(exp, workdir, prompt, n)
    beam, _ = generate.generate(exp, workdir, prompt_text, generate.Options(max_new_tokens=n, beam=1))
    assert beam == text
    sampled = {generate.generate(exp, workdir, prompt_text, generate.Options(max_new_tokens=n, seed=s))[0]
               for s in (0, 1)}
    assert len(sampled) > 1  # sampling at temperature 1 depends on the seed


@pytest.mark.slow  # trains a model until it copies
def test_a_model_trained_to_copy_generates_the_copy(tmp_path, capsys, compilation_cache):
    workdir = str(tmp_path / 'copy')
    fields = [f'--config.{k}={v}' for k, v in dict(
        **{'task.mode': 'copy', 'task.seq_len': 6, 'task.dependency_length': 6, 'task.num_symbols': 6,
           'model.num_layers': 2, 'model.d_model': 64, 'model.num_heads': 4, 'model.d_ff': 128,
           'train.steps': 400, 'train.batch_size': 32, 'optim.learning_rate': 3e-3, 'optim.warmup_steps': 50,
           'eval.every_steps': 400, 'eval.num_examples': 64, 'checkpoint.every_steps': 400}).items()]
    assert cli.main([f'--config={os.path.join(ROOT, "configs", "seq2seq.py")}', f'--workdir={workdir}', *fields,
                     '--quiet']) == 0
    capsys.readouterr()
    assert cli.main(['--generate', f'--workdir={workdir}', '--prompt=c a f b e d', '--temperature=0', '--quiet']) == 0
    assert capsys.readouterr().out.strip() == 'c a f b e d </s>'


def test_what_cannot_be_generated_is_one_line_and_status_2(lm_runs, tmp_path, capsys):
    exp, workdir = lm_runs['transformer']
    with pytest.raises(UserError, match="'k99' is not a token of task recall"):
        generate.check(exp, 'k1 k99', generate.Options())
    cases = [
        (['--generate', f'--workdir={workdir}', '--prompt='], '--prompt is empty'),
        (['--generate', f'--workdir={workdir}', '--prompt=k1', '--top_k=-1'], '--top_k=-1 must be in'),
        (['--generate', f'--workdir={workdir}'], '--generate needs the text to start from'),
        (['--generate', f'--workdir={tmp_path / "none"}', '--prompt=k1'], 'holds no run'),
        ([f'--config={os.path.join(ROOT, "configs", "recall.py")}', '--prompt=k1'], '--prompt needs --generate'),
    ]
    classifier = resolve.from_config(tiny_config('agreement', 'transformer', task__dependency_length=3,
                                                task__seq_len=8))
    with pytest.raises(UserError, match="--generate needs a language-model or sequence-to-sequence run; this one is "
                                        "a 'classify' run"):
        generate.check(classifier, 'the', generate.Options())
    for argv, says in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and says in err, (argv, err)
