"""`launch.py --generate --workdir=DIR --prompt=TEXT`: what a trained model writes.

The latest good checkpoint of DIR is restored (read only, like `--eval_only`), and the
prompt is read in the task's own notation (`Task.prompt_tokens`: UTF-8 bytes for
`text_lm`, token names as `--show_examples` prints them for generated tasks). A language
model continues the prompt by `--max_new_tokens`; a sequence-to-sequence model decodes
the prompt as its input. Decoding is the family's own (`ModelFamily.decoder`): the
Transformer's KV cache or a recurrent family's carried state, so the prompt is read once
and each new token costs one step. `--temperature=0` is greedy decoding, `--top_k`
samples among the k most likely tokens, `--beam=N` is beam search (N=1: greedy).
"""

from __future__ import annotations

import dataclasses
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.errors import UserError
from flaxformer_lite.resolve import Run
from flaxformer_lite.models import decoding
from flaxformer_lite.train import checkpoint
from flaxformer_lite.train.setup import build


@dataclasses.dataclass(frozen=True)
class Options:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    beam: int = 0  # 0: sample (greedy at temperature 0); N >= 1: beam search of width N
    seed: int = 0


def check(exp: Run, prompt: str | None, opts: Options) -> np.ndarray:
    """The prompt's tokens, or UserError for what cannot be generated (before any work)."""
    kind = exp.spec.kind
    if kind not in ('lm', 'seq2seq') or exp.family.decoder is None:
        raise UserError(f"--generate needs a language-model or sequence-to-sequence run; this one is a '{kind}' run "
                        f"(task {exp.task.name}, model.arch={exp.model_cfg.get('arch')}): evaluate it with --eval_only")
    if opts.max_new_tokens < 1:
        raise UserError(f'--max_new_tokens={opts.max_new_tokens} must be at least 1')
    if opts.temperature < 0:
        raise UserError(f'--temperature={opts.temperature} must be >= 0 (0: greedy)')
    if opts.top_k < 0 or opts.top_k > exp.spec.num_outputs:
        raise UserError(f'--top_k={opts.top_k} must be in [0, {exp.spec.num_outputs}] (0: every token)')
    if opts.beam < 0:
        raise UserError(f'--beam={opts.beam} must be >= 1 (or 0: no beam search)')
    if not prompt:
        raise UserError('--prompt is empty; give the text to start from (--prompt=TEXT or --prompt_file=FILE)')
    tokens = exp.task.prompt_tokens(prompt)
    if not len(tokens):
        raise UserError('--prompt holds no token; give the text to start from')
    if kind == 'seq2seq' and len(tokens) > exp.spec.input_len:
        raise UserError(f'--prompt has {len(tokens)} tokens; the model reads inputs of up to task.seq_len='
                        f'{exp.spec.input_len}')
    total = len(tokens) + opts.max_new_tokens
    if kind == 'lm' and exp.model_cfg.get('pos_encoding') == 'learned' and total > exp.model_cfg['max_len']:
        raise UserError(f"--prompt ({len(tokens)} tokens) + --max_new_tokens={opts.max_new_tokens} exceed "
                        f"model.max_len={exp.model_cfg['max_len']} (learned positions have no more); shorten them")
    return tokens


def generate(exp: Run, workdir: str, prompt: str | None, opts: Options) -> tuple[str, int]:
    """(the generated text, the checkpoint step it came from)."""
    tokens = check(exp, prompt, opts)
    if not checkpoint.check_workdir(workdir, exp.config.to_dict(), exp.derived):
        raise UserError(f'--generate: --workdir={workdir} holds no run; train one there first')
    if not checkpoint.steps_saved(workdir):
        raise UserError(f'--generate: --workdir={workdir} holds no checkpoint yet; train it first')
    setup = build(exp)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=exp.config.checkpoint.max_to_keep, async_save=False,
                                   read_only=True)
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            restored = ckpt.restore_latest(setup.abstract_state, warn=lambda line: print(line, file=sys.stderr))
            if restored is None:
                raise UserError(f'--generate: --workdir={workdir} holds no checkpoint yet; train it first')
            step, state, _, _ = restored
            out = np.asarray(jax.device_get(_decode(exp, state.params, tokens, opts)))[0]
    finally:
        ckpt.close()
    return exp.task.tokens_text(out), step


def _decode(exp: Run, params, tokens: np.ndarray, opts: Options) -> jax.Array:
    spec = exp.spec
    if spec.kind == 'lm':
        # The cache holds the prompt and every new token (a longer cache than training's is no parameter).
        total = len(tokens) + opts.max_new_tokens
        spec = dataclasses.replace(spec, input_len=max(spec.input_len, total), target_len=max(spec.target_len, total))
        prompt = jnp.asarray(tokens[None])
        batch, length, kwargs = {'inputs': prompt}, opts.max_new_tokens, {'prompt_BT': prompt}
    else:
        inputs = np.full((1, spec.input_len), spec.pad_id, np.int32)
        inputs[0, :len(tokens)] = tokens
        batch, length, kwargs = {'inputs': jnp.asarray(inputs)}, spec.target_len, {}
    fns = exp.family.decoder(exp.model_cfg, spec)
    if opts.beam:
        run = lambda p, b, pr: decoding.beam_search(  # noqa: E731
            fns, p, b, length=length, bos_id=spec.bos_id, beam_size=opts.beam, pad_id=spec.pad_id,
            **({'prompt_BT': pr} if pr is not None else {}))
    else:
        run = lambda p, b, pr: decoding.sample(  # noqa: E731
            fns, p, b, length=length, bos_id=spec.bos_id, rng=jax.random.key(opts.seed), temperature=opts.temperature,
            top_k=opts.top_k, pad_id=spec.pad_id, **({'prompt_BT': pr} if pr is not None else {}))
    return jax.jit(run)(params, batch, kwargs.get('prompt_BT'))
