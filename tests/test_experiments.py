"""The flagship experiment files: every form (quick, full, tune) defines a sweep whose
every trial resolves to a runnable experiment, with every family's learning rate tuned
at each size and budget it runs at, and report options, without training anything."""

import glob
import os

import pytest

from flaxformer_lite import resolve
from flaxformer_lite.sweep import plan, tuning

from conftest import ROOT

pytestmark = pytest.mark.slow  # the experiment files run end to end

FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'experiments', '*.py'))
               if 'get_sweep' in open(p).read())
FORMS = ['quick', 'full', 'quick,tune']


def test_the_flagship_experiments_are_all_there():
    names = {os.path.basename(f)[:-3] for f in FILES}
    assert {'long_range', 'length_generalisation', 'scaling_lm', 'listops', 'translation', 'transfer'} <= names


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('path', FILES)
def test_every_trial_of_every_form_resolves(path, form, tmp_path):
    sweep = plan.load(f'{path}:{form}', {}, str(tmp_path / 'sweep'), provisional=True)
    assert sweep.trials and not (tmp_path / 'sweep').exists()
    compared = set()
    for trial in sweep.trials:
        exp = resolve.from_config(sweep.trial_config(trial))
        compared.add((exp.family.name, exp.config.optim.parametrization))
        assert exp.config.train.steps >= 1
    assert len(compared) >= 2  # a comparison: of families, or of parametrisations
    module = plan.config_lib._module(path)  # noqa: SLF001
    spec = module.get_report(form)
    assert isinstance(spec, dict) and spec.get('title')
    defined = module.get_sweep(form)
    if isinstance(defined, tuning.Tuned):
        # every family tuned at every size and budget it runs at: trials that differ in
        # any of these fall in different tuning groups
        assert 'optim.learning_rate' in defined.grid and 'model.name' in defined.by
        assert not defined.budget  # tuned at the main trials' own budget
        keys = {}
        for trial in sweep.trials:
            cfg = sweep.trial_config(trial)
            where = (cfg.task.name, cfg.model.name, cfg.model.size, cfg.model.d_model, cfg.model.hidden,
                     cfg.train.steps, cfg.train.tokens, cfg.train.batch_size)
            keys.setdefault(where, set()).add(tuning.group_key(trial.overrides, defined.by))
        groups = [g for gs in keys.values() for g in gs]
        assert len(groups) == len(set(groups)), 'two sizes or budgets share one tuned rate'
    elif 'tune' not in form and spec.get('x') != 'optim.learning_rate':  # tuned by a separate sweep: one rate
        rates = {}
        for trial in sweep.trials:
            cfg = sweep.trial_config(trial)
            rates.setdefault((cfg.task.name, cfg.model.name), set()).add(cfg.optim.learning_rate)
        assert all(len(r) == 1 for r in rates.values()), rates


@pytest.mark.parametrize('path', FILES)
def test_every_experiment_reruns_with_other_seeds_and_counts(path):
    """`first_seed=` and `seeds=` (a rerun with other seeds, or more of them) work on every
    experiment file and change nothing but the seeds."""
    module = plan.config_lib._module(path)  # noqa: SLF001

    def trials(arg):
        defined = module.get_sweep(arg)
        if isinstance(defined, tuning.Tuned):  # its tuning seeds follow first_seed too
            first = min(t['train.seed'] for t in defined.main)
            assert sorted({t['train.seed'] for t in tuning.tune_trials(defined, {})}) == list(
                range(first, first + defined.seeds))
            return defined.main
        return defined
    seeds = lambda arg: sorted({t.get('train.seed', 0) for t in trials(arg)})  # noqa: E731
    settings = lambda arg: sorted({tuple(sorted((k, str(v)) for k, v in t.items() if k != 'train.seed'))  # noqa: E731
                                   for t in trials(arg)})
    first = seeds('quick')
    assert first == list(range(len(first)))
    assert seeds('quick,first_seed=7') == [7 + s for s in first]
    assert seeds('quick,seeds=4,first_seed=2') == [2, 3, 4, 5]
    assert settings('quick') == settings('quick,first_seed=3') == settings('quick,seeds=4')
    for bad in ('quick,seeds=0', 'quick,seeds=two', 'quick,first_seed=-1'):
        with pytest.raises(ValueError, match='seed'):
            module.get_sweep(bad)


def test_long_range_quick_has_three_seeds():
    module = plan.config_lib._module('experiments/long_range.py')  # noqa: SLF001
    assert sorted({t['train.seed'] for t in module.get_sweep('quick').main}) == [0, 1, 2]
