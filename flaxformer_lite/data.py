"""Input pipeline on grain: random-access task source -> shuffle -> per-host shard -> batch.

The training stream is a pure function of (task, train.seed, step): global batch `s` is
made of shuffled source positions [s * B, (s + 1) * B), of which process `p` of `P`
takes every P-th (so each host reads only its share). The grain iterator's state is
checkpointed with the model, so a resumed run sees exactly the batches an
uninterrupted one would. Evaluation uses the first `eval.num_examples` examples of the
held-out split, the same ones at every evaluation and in every run of the task.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks import Task

Batch = dict[str, np.ndarray]


def process_share(global_batch: int, process_count: int, field: str = 'train.batch_size') -> int:
    if global_batch % process_count:
        raise ConfigError(f'{field}={global_batch} is not divisible by the {process_count} processes; '
                          f'use a multiple of {process_count}')
    return global_batch // process_count


def train_dataset(task: Task, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """Endless shuffled batches (each epoch of a finite source reshuffled) for this host."""
    local = process_share(batch_size, process_count)
    n = task.num_examples('train')
    if n < batch_size:
        raise ConfigError(f'train.batch_size={batch_size} exceeds the {n} training examples of task '
                          f'{task.name}; lower train.batch_size')
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(lambda i: task.example('train', int(i)))
    return ds.batch(local, drop_remainder=True)


def train_iterator(task: Task, *, batch_size: int, seed: int, threads: int = 1, prefetch: int = 4,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state` / `set_state`) that prepares batches in
    background threads while the device computes."""
    ds = train_dataset(task, batch_size=batch_size, seed=seed, process_index=process_index,
                       process_count=process_count)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_batches(task: Task, *, num_examples: int, batch_size: int, split: str = 'eval',
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """The fixed held-out set as this host's slices of global batches. The last batch is
    filled with zero-weight copies, so every batch has one shape (one compilation)."""
    local = process_share(batch_size, process_count, 'eval.batch_size')
    available = task.num_examples(split)
    examples = [task.example(split, i) for i in range(min(num_examples, available))]
    if not examples:
        raise ConfigError(f"task {task.name} has no '{split}' examples; enlarge the dataset")
    pad = (-len(examples)) % batch_size
    filler = {k: np.zeros_like(v) if k == 'weights' else v for k, v in examples[0].items()}
    examples += [filler] * pad
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size][process_index * local:(process_index + 1) * local]
        batches.append({k: np.stack([ex[k] for ex in chunk]) for k in chunk[0]})
    return batches


def to_global(batch: Batch, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This host's slice of a batch -> one global array per field, laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
