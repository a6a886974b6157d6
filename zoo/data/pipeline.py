"""grain input pipelines: per split and per process, deterministic and checkpointable.

Train: shuffle (reshuffled each epoch) -> repeat -> read/decode -> per-image ops (seeded by
data seed + the example's position in the global stream) -> this process's rows of each
global batch -> drop unreadable examples -> batch -> optional worker processes (which then
also read and decode). Global batch b is positions [b*B, (b+1)*B) of the one shuffled stream
and process p of P reads its rows [p*B/P, (p+1)*B/P), so the global batch, and each example's
crop, is the same whatever the number of processes. The iterator's `get_state()` /
`set_state()` is saved in every checkpoint, so a resumed run sees exactly the batches an
uninterrupted run would have seen.

Eval: global batch b is examples [b*E, (b+1)*E) in the split's order, process p reads its
rows of it -> eval ops -> fixed-size batches, the last one padded, with a `mask`.

`Prefetch` runs an iterator (and e.g. the host -> device copy) in a background thread so that
the next batch is made while the device computes the current step; its `get_state()` is the
position after the last batch it *returned*, so checkpoints stay exact.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from zoo.data import sources
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
    views: Sequence[Any] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of train batches for this process.

    Batches are dicts of numpy arrays: `image` uint8 [B, H, W, C] and `label` int32 [B],
    where B = data.batch_size / process_count, and one more array per extra view of the
    method (`views`, zoo/methods/base.py's `View`: `image_1`, ...), each made from the same
    example by the view's own host ops. Without `views`, `data.train_ops` make `image`.
    The processes' batches, concatenated in process order, are the batch of one process.
    """
    batch_size = local_batch_size(data_config.batch_size, process_count)
    source = spec.source("train", data_config)
    ds = grain.MapDataset.source(source)
    if len(ds) < data_config.batch_size:
        raise ValueError(
            f"dataset '{spec.name}' has {len(ds)} training examples, fewer than one batch "
            f"({data_config.batch_size}); lower data.batch_size"
        )
    ds = ds.shuffle(seed=seed).repeat()
    repeats = data_config.get("repeated_augmentations", 1)
    if repeats != 1:
        ds = RepeatedSamples(ds, len(source), repeats)
    op = views_op(views, data_config)
    if op is not None:  # seeded by the global position: any number of processes, same crop
        ds = ds.random_map(skip_none(op), seed=seed)
    if process_count > 1:
        ds = ProcessRows(ds, batch_size, process_index, process_count)
    # Sources return None for an unreadable file (sources.py); dropping it after the map keeps
    # every other example's rng (seeded by its index) and the iterator state exact.
    iter_ds = ds.to_iter_dataset(read_options(source)).filter(lambda example: example is not None)
    iter_ds = iter_ds.batch(batch_size, drop_remainder=True)
    if data_config.num_workers > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) use defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        )
    return iter(iter_ds)


class RepeatedSamples(grain.MapDataset):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's `RASampler`): each epoch takes the
    first ceil(N / repeats) examples of that epoch's shuffled order and yields each `repeats`
    times in a row, truncated to N, so an epoch keeps its length and the copies of an example
    sit in the same global batch (DeiT puts them on different devices of one step) with
    different crops (the per-image ops are seeded by the position in the stream).

    `parent` is the endless shuffled stream: epoch e is its elements [e * N, (e + 1) * N).
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, epoch_size: int, repeats: int):
        super().__init__(parent)
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(
                f"data.repeated_augmentations must be an integer >= 1 (1 = off; DeiT uses 3), "
                f"got {repeats}"
            )
        self._epoch_size, self._repeats = epoch_size, repeats

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._epoch_size)
        return self._parent[epoch * self._epoch_size + position // self._repeats]

    def __str__(self) -> str:
        return f"RepeatedSamples(repeats={self._repeats}, epoch_size={self._epoch_size})"


class ProcessRows(grain.MapDataset):
    """Process `process_index`'s `rows` consecutive elements of each global batch of
    `rows * process_count` elements of `parent`: element i is the parent's
    (i // rows * process_count + process_index) * rows + i % rows."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, rows: int, process_index: int, count: int):
        super().__init__(parent)
        self._rows, self._index, self._count = rows, process_index, count

    def __len__(self) -> int:
        return len(self._parent) // (self._rows * self._count) * self._rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._rows)
        return self._parent[(batch * self._count + self._index) * self._rows + row]

    def __str__(self) -> str:
        return f"ProcessRows(rows={self._rows}, process {self._index} of {self._count})"


def views_op(views: Sequence[Any] | None, data_config: Any) -> Callable | None:
    """The host op that makes every view of an example (None when there is nothing to do).

    One view keyed `image` is its host ops applied in place; several views are each made from
    the original example by their own ops, in order, from the example's one generator (so the
    same seed gives the same views).
    """
    if views is None:
        ops = build_ops(data_config.train_ops)
        return compose(ops) if ops else None
    if len(views) == 1 and views[0].key == "image":
        ops = build_ops(views[0].host_ops)
        return compose(ops) if ops else None
    made = [(view.key, compose(build_ops(view.host_ops))) for view in views]

    def op(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = {k: v for k, v in example.items() if k != "image"}
        for key, make in made:
            out[key] = make(example, rng)["image"]
        return out

    return op


def in_memory(source: Any) -> bool:
    """Whether `source` reads numpy arrays held in memory (an ArraySource, or wrappers of one
    that keep it as `.source`)."""
    while not isinstance(source, sources.ArraySource):
        source = getattr(source, "source", None)
        if source is None:
            return False
    return True


def read_options(source: Any) -> grain.ReadOptions:
    """No reader threads for in-memory sources (grain's advice for data in memory): its default
    16 threads and 500-element buffer cost ~1 ms per example on 2 cores (GIL contention, and a
    scan of the whole buffer per element), 2x the cost of reading and cropping it. Sources that
    read files keep grain's defaults, where threads overlap I/O and decoding."""
    if in_memory(source):
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions()


class Prefetch:
    """`fn(batch)` for each batch of `iterator`, computed `size` batches ahead in a thread.

    The loop uses it to make the next batch and start its host -> device copy while the device
    runs the current step (dispatch is asynchronous). Batches come out identical and in the
    same order as from `iterator`; `get_state()` is `iterator`'s state after the last batch
    returned by `next` (not the last one made), so a checkpoint resumes exactly. Set the
    iterator's state before wrapping it; `close()` stops the thread and closes `iterator`.
    """

    def __init__(self, iterator: Any, fn: Callable[[Any], Any] | None = None, size: int = 2):
        self._iterator, self._fn = iterator, fn or (lambda batch: batch)
        self._state = copy.deepcopy(iterator.get_state())
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="zoo-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._fn(next(self._iterator))
                self._put((batch, copy.deepcopy(self._iterator.get_state()), None))
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put((None, None, error))

    def _put(self, entry: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        self._state = state
        return batch

    def get_state(self) -> Any:
        return copy.deepcopy(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if hasattr(self._iterator, "close"):  # stops grain worker processes, if any
            self._iterator.close()


def eval_batches(
    spec: DatasetSpec,
    data_config: Any,
    *,
    role: str = "eval",
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of the split playing `role` once (this process's share), with the eval
    ops, in fixed-size batches with a `mask`. `role="train"` serves feature evaluators
    (k-NN, linear probe), which need the training split's features without augmentation.

    Global batch b holds examples [b*E, (b+1)*E) of the split (E = data.eval_batch_size);
    process p yields rows [p*E/P, (p+1)*E/P) of each, padded: every process yields the same
    number of batches, so that collectives in the eval step never wait on a process that ran
    out, and the global batches are the same for any number of processes.
    """
    batch_size = local_batch_size(data_config.eval_batch_size, process_count)
    source = spec.source(role, data_config)
    num_batches = math.ceil(len(source) / data_config.eval_batch_size)
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        # Positions past the end fall into the next "epoch": ProcessRows over a repeated
        # source, cut to this process's examples that exist.
        rows = ProcessRows(ds.repeat(), batch_size, process_index, process_count)
        ds = rows[: _rows_in_range(len(source), batch_size, process_index, process_count)]
    # Eval ops are deterministic; a fixed generator serves ops that take one anyway.
    op = skip_none(compose(build_ops(data_config.eval_ops)))
    ds = ds.map(lambda example: op(example, _EVAL_RNG))
    batches = iter(ds.to_iter_dataset().filter(lambda e: e is not None).batch(batch_size))
    template = None
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:  # this process's share is exhausted: an all-padding batch
            template = template or _first_example(source, op, spec.name)
            batch = {k: v[:0] for k, v in template.items()}
        template = batch
        yield pad_batch(batch, batch_size)


def _rows_in_range(num_examples: int, rows: int, process_index: int, process_count: int) -> int:
    """How many rows of process `process_index` (`rows` per global batch) the first
    `num_examples` positions hold: its full shares, then its part of the last batch."""
    full, rest = divmod(num_examples, rows * process_count)
    return full * rows + min(max(rest - process_index * rows, 0), rows)


def _first_example(source: Any, op: Callable, name: str) -> dict[str, np.ndarray]:
    """The first readable example of `source` after `op`, as a batch of one (the shapes of
    a padding batch for a process whose share is empty)."""
    for index in range(len(source)):
        if (example := op(source[index], _EVAL_RNG)) is not None:
            return {k: np.asarray(v)[None] for k, v in example.items()}
    raise ValueError(f"dataset '{name}' has no readable example to evaluate on")


_EVAL_RNG = np.random.default_rng(0)


def skip_none(op):
    """`op` that passes a None example (an unreadable file) through untouched."""

    def apply(example, rng):
        return None if example is None else op(example, rng)

    return apply


def example_batch(
    spec: DatasetSpec, data_config: Any, views: Sequence[Any] | None = None
) -> dict[str, np.ndarray]:
    """A batch of one training example after the train ops (of each view, see
    `train_iterator`), to initialise a model with the shapes it will train on (the first
    readable example of the training split)."""
    source = spec.source("train", data_config)
    example = next((e for e in (source[i] for i in range(len(source))) if e is not None), None)
    if example is None:
        raise ValueError(f"dataset '{spec.name}' has no readable training example")
    op = views_op(views, data_config) or compose([])
    example = op(example, np.random.default_rng(0))
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
