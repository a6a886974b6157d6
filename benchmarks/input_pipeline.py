"""Input-pipeline throughput next to the train step's: does the input starve the step?

ImageNet-style training preprocessing on an image folder of ~500x375 JPEGs (decode with
Pillow, random_resized_crop 224, flip, rand_augment m9) through the grain pipeline with 0, 1
and 2 worker processes, and the train step's own images/s for resnet50 at 224 (zoo's one
jitted train step, one device); also the main job's input (configs/default.py: the embedded
Fashion-MNIST subset in memory, `random_crop(padding=2)|flip`, batch 32). Prints a markdown
table.

    python benchmarks/input_pipeline.py                    # defaults below
    python benchmarks/input_pipeline.py --batches=50 --step_batch=16 --steps=3
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "")  # one CPU device, as a user's machine

import jax
import numpy as np
from PIL import Image

from configs import common
from zoo.data import pipeline
from zoo.data.augment import make_augment
from zoo.data.datasets import get_dataset
from zoo.methods.supervised import supervised
from zoo.models import create_model
from zoo.training import loop
from zoo.training import step as step_lib
from zoo.training.optim import build_optimizer

TRAIN_OPS = "random_resized_crop(size=224)|flip|rand_augment(num_ops=2, magnitude=9)"


def write_jpeg_folder(root: pathlib.Path, count: int) -> None:
    """`count` JPEGs of 500x375 (quality 90) cut from scikit-image's photos, 2 classes."""
    from skimage import data as photos

    sources = [photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket()]
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)]).resize((520 + i % 7, 400 + i % 5))
        image = image.crop((i % 20, i % 25, i % 20 + 500, i % 25 + 375))
        path = root / f"class_{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)


def input_images_per_second(root: pathlib.Path, workers: int, batches: int, batch: int) -> float:
    config = common.base().data
    config.unlock()
    config.update(dict(batch_size=batch, train_ops=TRAIN_OPS, num_workers=workers))
    spec = get_dataset(f"folder:{root}", config)
    iterator = pipeline.train_iterator(spec, config, seed=0)
    for _ in range(2 + workers):  # warm-up: worker start-up and their first batches
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return batches * batch / seconds


def default_job_input_images_per_second(batches: int) -> float:
    """The main job's input pipeline alone (configs/default.py), in the main process."""
    from configs import default

    config = default.get_config().data
    iterator = pipeline.train_iterator(get_dataset(config.name, config), config, seed=0)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.batch_size / (time.perf_counter() - start)


def train_step_images_per_second(model_name: str, batch: int, steps: int) -> float:
    config = common.base()
    mesh = step_lib.make_mesh(jax.devices()[:1])
    method = supervised(create_model(model_name, num_classes=1000), 1000)
    tx, schedule = build_optimizer(config.optim, config.schedule, 1000, 100)
    augment = make_augment((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8),
        "label": rng.integers(0, 1000, (batch,), dtype=np.int32),
    }
    example = {k: v[:1] for k, v in host_batch.items()}
    state = loop.init_state(method, tx, example, augment, jax.random.PRNGKey(0), mesh)
    train_step = step_lib.compile_train_step(
        mesh, method=method, tx=tx, augment=augment, schedule=schedule
    )
    device_batch = step_lib.device_batch(host_batch, mesh)
    state, metrics = train_step(state, device_batch, jax.random.PRNGKey(1))  # compile + 1
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, device_batch, jax.random.PRNGKey(1))
    jax.block_until_ready(metrics)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="JPEGs in the folder")
    parser.add_argument("--batches", type=int, default=20, help="timed input batches")
    parser.add_argument("--batch", type=int, default=16, help="input batch size")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to time")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--step_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (0 = skip)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_jpeg_folder(root, args.images)
        for workers in (int(w) for w in args.workers.split(",")):
            rate = input_images_per_second(root, workers, args.batches, args.batch)
            rows.append((f"input pipeline, {workers} worker process(es)", rate))
            print(f"  {rows[-1][0]}: {rate:.1f} img/s", flush=True)
    rate = default_job_input_images_per_second(10 * args.batches)
    rows.append(("input pipeline, main job (embedded Fashion-MNIST, 28x28, batch 32)", rate))
    print(f"  {rows[-1][0]}: {rate:.1f} img/s", flush=True)
    if args.steps:
        rate = train_step_images_per_second(args.model, args.step_batch, args.steps)
        rows.append((f"train step, {args.model} @224, batch {args.step_batch}", rate))
        print(f"  {rows[-1][0]}: {rate:.2f} img/s", flush=True)

    print(f"\n{os.cpu_count()} CPU cores, {jax.devices()[0].platform}; ops: `{TRAIN_OPS}`\n")
    print("| what | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} |" if rate >= 10 else f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
