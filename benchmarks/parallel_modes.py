"""Step time and compile time of the train step under jit and pmap, on 1 and on N devices.

    python benchmarks/parallel_modes.py                       # CPU: 8 host devices
    python benchmarks/parallel_modes.py --models resnet20 --batch 64 --steps 20

The same `zoo.training.step` body compiled by `Parallel(mesh, mode)` for each model, fed one
fixed batch of the embedded Fashion-MNIST at 32 px; rounds alternate between the setups so
that machine drift hits them alike. On CPU, N devices are XLA host devices sharing the same
cores (`--xla_force_host_platform_device_count`), so the comparison shows each mode's overhead
(collectives, per-device programs), not a speed-up. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from zoo.data import pipeline  # noqa: E402
from zoo.data.datasets import get_dataset  # noqa: E402
from zoo.training import loop  # noqa: E402
from zoo.training import step as step_lib  # noqa: E402

MODELS = {
    "resnet20": {},
    "vit_tiny_patch16_224": {"patch_size": 4, "img_size": 32},
}


def setup(name: str, devices, mode: str, batch_size: int):
    """(run one step, compile seconds) of `name`'s train step on `devices` in `mode`."""
    c = common.base()
    c.model.name = name
    for key, value in MODELS[name].items():
        c.model[key] = value
    c.data.batch_size, c.data.train_ops = batch_size, "resize(size=32)|flip"
    c.parallel.mode = mode
    spec = get_dataset(c.data.name, c.data)
    parts = loop.build(c, spec, step_lib.make_mesh(devices))
    parallel = parts.parallel
    state = parallel.put_state(parts.init(jax.random.PRNGKey(0)))
    batch = parallel.put_batch(next(pipeline.train_iterator(spec, c.data, seed=0)))
    step = parallel.compile_train_step(
        method=parts.method, tx=parts.tx, augment=parts.augment, schedule=parts.schedule
    )
    rng = jax.random.PRNGKey(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run() -> None:
        holder[0], metrics = compiled(holder[0], batch, rng)  # the state is donated
        jax.block_until_ready(metrics)

    run()  # warm-up
    return run, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    count = jax.device_count()
    print(f"{jax.devices()[0].device_kind}, {count} devices, batch {args.batch}")
    print("| model | devices | mode | compile s | step ms | img/s |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        setups = {
            (n, mode): setup(name, jax.devices()[:n], mode, args.batch)
            for n in sorted({1, count})
            for mode in ("jit", "pmap")
        }
        times: dict = {key: [] for key in setups}
        for _ in range(args.rounds):
            for key, (run, _) in setups.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    run()
                times[key].append((time.perf_counter() - start) / args.steps)
        for (n, mode), (_, compile_s) in setups.items():
            step_s = float(np.median(times[n, mode]))
            print(
                f"| {name} | {n} | {mode} | {compile_s:.1f} | {step_s * 1e3:.1f} | "
                f"{args.batch / step_s:.0f} |"
            )


if __name__ == "__main__":
    main()
