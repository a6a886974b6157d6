"""grain input pipelines: per split and per process, deterministic and checkpointable.

Train: shard by process -> shuffle (reshuffled each epoch) -> repeat -> read/decode ->
per-image ops (seeded by data seed + example index) -> drop unreadable examples -> batch ->
optional worker processes (which then also read and decode). The iterator's
`get_state()`/`set_state()` is saved in every checkpoint, so a resumed run sees exactly the
batches an uninterrupted run would have seen.

Eval: shard by process -> eval ops -> fixed-size batches, the last one padded, with a `mask`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from zoo.data.datasets import DatasetSpec
from zoo.data.transforms import build_ops, compose


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"data.batch_size={global_batch_size} must be divisible by the number of "
            f"processes ({process_count})"
        )
    return global_batch_size // process_count


def train_iterator(
    spec: DatasetSpec,
    data_config: Any,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of train batches for this process.

    Batches are dicts of numpy arrays: `image` uint8 [B, H, W, C] and `label` int32 [B],
    where B = data.batch_size / process_count.
    """
    batch_size = local_batch_size(data_config.batch_size, process_count)
    source = spec.source("train", data_config)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) < batch_size:
        raise ValueError(
            f"dataset '{spec.name}' has {len(ds)} training examples per process, fewer than "
            f"one batch ({batch_size}); lower data.batch_size"
        )
    ds = ds.shuffle(seed=seed).repeat()
    ops = build_ops(data_config.train_ops)
    if ops:
        ds = ds.random_map(skip_none(compose(ops)), seed=seed)
    # Sources return None for an unreadable file (sources.py); dropping it after the map keeps
    # every other example's rng (seeded by its index) and the iterator state exact.
    iter_ds = ds.to_iter_dataset().filter(lambda example: example is not None)
    iter_ds = iter_ds.batch(batch_size, drop_remainder=True)
    if data_config.num_workers > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) use defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        )
    return iter(iter_ds)


def eval_batches(
    spec: DatasetSpec,
    data_config: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example of this process once, in fixed-size batches with a `mask`.

    Each process yields the same number of batches (padding with masked examples), so that
    collectives in the eval step never wait on a process that ran out.
    """
    batch_size = local_batch_size(data_config.eval_batch_size, process_count)
    source = spec.source("eval", data_config)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    eval_ops = build_ops(data_config.eval_ops)
    if eval_ops:
        # Eval ops are deterministic; a fixed generator serves ops that take one anyway.
        ds = ds.map(lambda example: skip_none(compose(eval_ops))(example, _EVAL_RNG))
    num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
    batches = iter(ds.to_iter_dataset().filter(lambda e: e is not None).batch(batch_size))
    template = None
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:  # this process's shard is exhausted: an all-padding batch
            batch = {k: v[:0] for k, v in template.items()}
        template = batch
        yield pad_batch(batch, batch_size)


_EVAL_RNG = np.random.default_rng(0)


def skip_none(op):
    """`op` that passes a None example (an unreadable file) through untouched."""

    def apply(example, rng):
        return None if example is None else op(example, rng)

    return apply


def example_batch(spec: DatasetSpec, data_config: Any) -> dict[str, np.ndarray]:
    """A batch of one training example after the train ops, to initialise a model with the
    shapes it will train on (the first readable example of the training split)."""
    source = spec.source("train", data_config)
    example = next((e for e in (source[i] for i in range(len(source))) if e is not None), None)
    if example is None:
        raise ValueError(f"dataset '{spec.name}' has no readable training example")
    example = compose(build_ops(data_config.train_ops))(example, np.random.default_rng(0))
    return {k: np.asarray(v)[None] for k, v in example.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads every array to `batch_size` rows and adds `mask` (1 for real examples)."""
    n = len(batch["label"])
    padded = {
        k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    padded["mask"] = (np.arange(batch_size) < n).astype(np.float32)
    return padded
