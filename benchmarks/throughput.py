"""Throughput, compile time and FLOP utilisation of zoo's models, side by side with PyTorch/timm.

Train = zoo's one train step (`zoo.training.step.train_step` via `compile_train_step`, the
supervised method, an optax SGD or AdamW from `zoo.training.optim`): forward + backward +
optimizer update. Inference = the forward pass in eval mode, jitted. Images/s is the median
over timed steps after warm-up (min-max beside it); warm-up lasts until three steps in a row
fault in no fresh memory (`warm_up`; at most `--max-warmup` steps), and the JSON keeps each
framework's most page faults in a timed step (`page_faults_max`). FLOPs per image come from
XLA's cost analysis of the compiled forward; training counts 3 x forward, because XLA's
analysis over-counts the gradients of grouped convolutions. Utilisation is achieved FLOP/s over a
float32 4096^2 matmul timed on the same machine in the same run (CPU), or over the chip's
dense bf16 peak from a datasheet table (GPU/TPU; MFU).

With `--vs-timm` the same model runs in PyTorch/timm (random weights, same batch, resolution,
precision and optimizer, `torch.set_num_threads(os.cpu_count())`), its timed rounds
alternating with zoo's in the same process, so machine noise hits both; the ratio is zoo/timm.
Each timed step follows `--pause` seconds of idle (default 1): zoo's step right after a
PyTorch step read ~20% slower than after a pause, PyTorch's unchanged (`interleaved`). Each
row runs in a fresh process (`row_in_subprocess`; `--same-process` to keep one): rows
measured late in one long process read zoo ~25% slower.

    # the table of README's "Speed" section (2-core CPU, ~25 min):
    HF_HUB_OFFLINE=1 python benchmarks/throughput.py --vs-timm --out results.json
    # one model, one mode:
    python benchmarks/throughput.py --models resnet50 --modes train --vs-timm --steps 5
    # what fields of zoo's CPU policy (zoo.cpu.CpuPolicy) are worth: the train step compiled
    # twice, with the default policy and with those fields changed, interleaved with timm's:
    python benchmarks/throughput.py --models swin_tiny_patch4_window7_224 --modes train \
        --vs-timm --steps 6 --compare attention_vjp pointwise_gradient_buffer
    # a GPU (bf16, large batch, MFU against the chip's peak):
    python benchmarks/throughput.py --device gpu --vs-timm --out results_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zoo.cpu import allocator  # noqa: E402  (light: no JAX yet)

if __name__ == "__main__":  # before numpy, JAX and PyTorch start threads (zoo/cpu/allocator.py)
    allocator.keep_freed_memory()  # zoo as train.py runs large jobs; timm shares it

import jax  # noqa: E402
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo import cpu
from zoo.cpu import CpuPolicy
from zoo.methods.supervised import supervised
from zoo.models import create_model
from zoo.models.cost import compiled_flops
from zoo.training import step as step_lib
from zoo.training.optim import build_optimizer
from zoo.training.state import TrainState

# Dense bf16 peak FLOP/s per chip (vendor datasheets, without sparsity), keyed by a substring
# of `jax.devices()[0].device_kind`. float32 runs are reported against the same figure.
CHIP_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "V100": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table: a zoo model and its timm counterpart ("" = timm lacks it)."""

    name: str
    size: int
    optimizer: str  # the usual recipe's: "sgd" (CNNs) or "adamw" (transformers, ConvNeXt)
    zoo_kwargs: tuple = ()
    timm_name: str = ""
    cifar_stem: bool = False  # timm: conv1 -> 3x3 stride 1, max-pool removed


CASES = {
    c.name: c
    for c in (
        Case("resnet50", 224, "sgd", timm_name="resnet50"),
        Case("efficientnet_b0", 224, "sgd", timm_name="efficientnet_b0"),
        Case("vit_small_patch16_224", 224, "adamw", timm_name="vit_small_patch16_224"),
        Case(
            "swin_tiny_patch4_window7_224", 224, "adamw", timm_name="swin_tiny_patch4_window7_224"
        ),
        Case("convnext_tiny", 224, "adamw", timm_name="convnext_tiny"),
        Case("resnet18", 32, "sgd", (("stem", "cifar"),), "resnet18", cifar_stem=True),
        Case("resnet20", 32, "sgd"),
    )
}


def case_label(case: Case) -> str:
    return f"{case.name}{'-cifar' if case.cifar_stem else ''}@{case.size}"


def matmul_peak(n: int = 4096, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul on the default device (best of `repeats`)."""
    step = matmul_step(n, dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_step(n: int = 4096, dtype=jnp.float32) -> Callable[[], None]:
    """One n x n matmul, run and waited for; timed in the rounds as the peak reference."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    return lambda: dot(a, a).block_until_ready()


def optimizer_config(name: str):
    """The optim/schedule namespaces `build_optimizer` reads (typical recipe values)."""
    optim = ml_collections.ConfigDict(
        dict(
            name=name,
            lr=0.1 if name == "sgd" else 1e-3,
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-4 if name == "sgd" else 0.05,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=0.0,
        )
    )
    schedule = ml_collections.ConfigDict(
        dict(name="cosine", warmup_steps=10, warmup_epochs=0, end_lr_factor=0.0)
    )
    return optim, schedule


def fake_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch, size, size, 3), dtype=np.float32),
        "label": rng.integers(0, num_classes, (batch,), dtype=np.int32),
    }


@dataclasses.dataclass
class Runner:
    """A prepared benchmark: `step()` runs one step and waits for it."""

    step: Callable[[], None]
    compile_s: float  # zoo: lower + XLA compile; timm: the first (eager) step
    flops_per_image: float = 0.0


def zoo_runner(
    case: Case, mode: str, batch: int, dtype, num_classes: int = 1000, policy_fields=None
) -> Runner:
    """zoo's jitted train step (or eval forward) for `case` on one device, with the default
    CPU policy or the policy with `policy_fields` replaced."""
    model = create_model(case.name, num_classes=num_classes, dtype=dtype, **dict(case.zoo_kwargs))
    data = fake_batch(batch, case.size, num_classes)
    rng = jax.random.PRNGKey(0)
    device = jax.devices()[0]
    policy = cpu.policy_for([device], dataclasses.replace(cpu.default(), **(policy_fields or {})))
    variables = jax.jit(
        cpu.traced(
            lambda r: model.init(r, jnp.zeros((1, case.size, case.size, 3)), train=False), policy
        ),
        compiler_options=cpu.once_compiler_options(device.platform),
    )(rng)
    forward = jax.jit(  # compiled as zoo's evaluation step and Classifier compile a forward
        cpu.traced(lambda v, x: model.apply(v, x, train=False), policy),
        compiler_options=cpu.forward_compiler_options(device.platform),
    )
    if mode == "infer":
        start = time.perf_counter()
        compiled = forward.lower(variables, data["image"]).compile()
        compile_s = time.perf_counter() - start
        images = jax.device_put(data["image"])
        flops = compiled_flops(compiled) / batch
        return Runner(lambda: compiled(variables, images).block_until_ready(), compile_s, flops)
    one = forward.lower(variables, data["image"][:1]).compile()
    flops = 3 * compiled_flops(one)  # forward + backward ~ 3 x forward (see module docstring)
    mesh = step_lib.make_mesh(jax.devices()[:1])
    method = supervised(model, num_classes)
    tx, schedule = build_optimizer(*optimizer_config(case.optimizer), 1000, 100)
    params = variables.pop("params")
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=dict(variables),
        opt_state=jax.jit(tx.init)(params),
        extra={},
    )
    state = jax.device_put(state, step_lib.shardings(mesh)[0])
    train_step = step_lib.compile_train_step(
        mesh,
        policy=policy,
        method=method,
        tx=tx,
        augment=lambda b, r, axis_name=None: b,
        schedule=schedule,
    )
    batch_arrays = step_lib.device_batch(data, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch_arrays, rng).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def step() -> None:
        holder[0], metrics = compiled(holder[0], batch_arrays, rng)  # state is donated
        jax.block_until_ready(metrics)

    return Runner(step, compile_s, flops)


def timm_runner(
    case: Case, mode: str, batch: int, precision: str, device: str, channels_last: bool
) -> Runner:
    """The same model in PyTorch/timm (random weights), eager, same optimizer."""
    import timm
    import torch

    torch.set_num_threads(os.cpu_count())
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = timm.create_model(case.timm_name, pretrained=False, num_classes=1000)
    if case.cifar_stem:
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, dtype, memory_format=memory_format)
    data = fake_batch(batch, case.size, 1000)
    images = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).to(dev, dtype)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.from_numpy(data["label"]).long().to(dev)
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(images)
            sync()

    else:
        model.train()
        optim, _ = optimizer_config(case.optimizer)
        if optim.name == "sgd":
            opt = torch.optim.SGD(
                model.parameters(), optim.lr, momentum=0.9, weight_decay=optim.weight_decay
            )
        else:
            opt = torch.optim.AdamW(model.parameters(), optim.lr, weight_decay=optim.weight_decay)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
            opt.step()
            sync()

    start = time.perf_counter()
    step()  # eager: the first step is the warm-up
    return Runner(step, time.perf_counter() - start)


TRUE_WORDS, FALSE_WORDS = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def parse_policy_fields(specs: list[str]) -> dict[str, bool | int]:
    """`field` (a bool of zoo.cpu.CpuPolicy, flipped) or `field=value` -> {field: value}; an
    unknown field or a value of the wrong kind is a ValueError that lists what exists."""
    default = cpu.default()
    fields = CpuPolicy.field_names()
    settings = {}
    for spec in specs:
        name, has_value, text = spec.partition("=")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"--compare: {name!r} is not a field of zoo.cpu.CpuPolicy.{hint} Fields: "
                f"{', '.join(fields)}"
            )
        value = getattr(default, name)
        if isinstance(value, bool):
            if has_value and text.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(f"--compare: {name} is on/off; got {text!r} (use true or false)")
            settings[name] = text.lower() in TRUE_WORDS if has_value else not value
        elif not has_value:
            raise ValueError(f"--compare: {name} takes a value, e.g. {name}={value}")
        else:
            try:
                settings[name] = int(text)
            except ValueError:
                raise ValueError(
                    f"--compare: {name} is a whole number; got {text!r} (e.g. {name}={value})"
                ) from None
    return settings


def page_faults() -> int:
    """Minor page faults of this process so far (0 where `resource` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# XLA:CPU allocates a step's temporaries as one buffer (1.7 GB for vit_small's train step at
# batch 16), the next step's before the last one's is freed, and glibc (zoo's settings,
# zoo/cpu/allocator.py) served it from fresh memory until the heap held about three of them: such a
# step faulted in 430,000 pages and took 4.8 s instead of 2.7 (2-core Zen4). Which steps did
# varied from run to run: the 3rd to 6th, the 3rd, 4th, 8th and 9th, or only the 10th
# (vit_small, swin_tiny, convnext_tiny), and from then on none did. So the untimed steps go
# on until `SETTLED_STEPS` in a row fault in fewer than `SETTLED_FAULTS` pages.
SETTLED_STEPS = 3
SETTLED_FAULTS = 1000  # 4 MB of 4 KiB pages; a step's temporaries are hundreds of MB


def warm_up(runner: Runner, least: int, most: int) -> int:
    """`least` untimed steps, then more, up to `most` in all, until the heap has settled
    (`SETTLED_STEPS` steps in a row without page faults); returns the steps run."""
    quiet = 0
    for done in range(1, max(least, most) + 1):
        before = page_faults()
        runner.step()
        quiet = quiet + 1 if page_faults() - before < SETTLED_FAULTS else 0
        if done >= least and quiet >= min(SETTLED_STEPS, most):
            return done
    return max(least, most)


def interleaved(
    runners: dict[str, Runner],
    warmup: int,
    steps: int,
    pause: float = 0.0,
    cpu: dict[str, list[float]] | None = None,
    faults: dict[str, list[int]] | None = None,
    max_warmup: int = 0,
) -> dict[str, list[float]]:
    """Per-step seconds of each runner; rounds of one step alternate between the runners
    (order reversed every round) so that slow minutes on a shared machine hit all of them.
    `pause` seconds of idle precede each timed step: right after a PyTorch step, zoo's next
    step ran ~20% slower than after a pause (convnext_tiny train 2.07 vs 2.52 img/s, timm
    3.52 vs 3.48; 2-core CPU), and a run of one framework alone has no such neighbour.
    `cpu`, if given, receives each step's CPU seconds (user + system, all threads), `faults`
    its page faults. Each runner first takes `warmup` untimed steps, and up to `max_warmup`
    while its steps still fault in pages (`warm_up`)."""
    names = list(runners)
    for name in names:
        warm_up(runners[name], warmup, max_warmup)
    times = {name: [] for name in names}
    for round_index in range(steps):
        for name in names if round_index % 2 == 0 else names[::-1]:
            time.sleep(pause)
            faults_start = page_faults()
            cpu_start = time.process_time()
            start = time.perf_counter()
            runners[name].step()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - cpu_start)
            if faults is not None:
                faults.setdefault(name, []).append(page_faults() - faults_start)
    return times


def paired_ratio(fast: list[float], slow: list[float]) -> float:
    """Median over rounds of slow[i] / fast[i]: how many times faster `fast` ran than `slow`
    within a round. The steps of one round run seconds apart, so a slow minute on a shared
    machine slows both, where the ratio of two medians can pair a slow step with a fast one."""
    return statistics.median(b / a for a, b in zip(fast, slow, strict=True))


def summarize(
    times: list[float], batch: int, flops_per_image: float, peak: float, cpu=None, faults=None
) -> dict:
    median = statistics.median(times)
    images_per_s = batch / median
    achieved = flops_per_image * images_per_s
    summary = {
        "images_per_s": images_per_s,
        "images_per_s_min": batch / max(times),
        "images_per_s_max": batch / min(times),
        "step_ms": 1e3 * median,
        "gflops_per_image": flops_per_image / 1e9,
        "achieved_gflops": achieved / 1e9,
        "utilisation": achieved / peak if peak else 0.0,
    }
    if cpu:  # CPU seconds per wall second: how many cores the step kept busy
        summary["cores_busy"] = sum(cpu) / sum(times)
    if faults:  # more than a few thousand: a timed step paid for fresh memory (`warm_up`)
        summary["page_faults_max"] = max(faults)
    return summary


def bench_case(case: Case, mode: str, args: argparse.Namespace, peak: float) -> dict:
    """One row: zoo (and timm, when asked and available) for one case and mode."""
    batch = batch_size(case, mode, args)
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    zoo = zoo_runner(case, mode, batch, dtype)
    runners = {"zoo": zoo}
    settings = parse_policy_fields(args.compare)
    if settings:  # the same model traced and compiled again with the fields changed
        runners["zoo_switched"] = zoo_runner(case, mode, batch, dtype, policy_fields=settings)
    use_timm = args.vs_timm and bool(case.timm_name)
    if use_timm:
        runners["timm"] = timm_runner(
            case, mode, batch, args.precision, args.device, args.channels_last
        )
    if args.device == "cpu":  # the peak, timed in the same rounds: same noise as the models
        runners["matmul"] = Runner(matmul_step(args.matmul_size), 0.0)
    cpu, faults = {}, {}
    times = interleaved(runners, args.warmup, args.steps, args.pause, cpu, faults, args.max_warmup)
    if args.device == "cpu":
        peak = 2 * args.matmul_size**3 / min(times["matmul"])
    row = {"model": case_label(case), "mode": mode, "batch": batch, "precision": args.precision}
    row["peak_gflops"] = peak / 1e9
    row["zoo"] = {
        "compile_s": zoo.compile_s,
        **summarize(
            times["zoo"], batch, zoo.flops_per_image, peak, cpu.get("zoo"), faults.get("zoo")
        ),
    }
    if settings:
        other = runners["zoo_switched"]
        row["zoo_switched"] = {
            "switches": settings,
            "compile_s": other.compile_s,
            **summarize(
                times["zoo_switched"],
                batch,
                zoo.flops_per_image,
                peak,
                cpu.get("zoo_switched"),
                faults.get("zoo_switched"),
            ),
        }
        row["zoo_over_switched"] = row["zoo"]["images_per_s"] / row["zoo_switched"]["images_per_s"]
        row["zoo_over_switched_paired"] = paired_ratio(times["zoo"], times["zoo_switched"])
    if use_timm:
        timm_row = summarize(
            times["timm"], batch, zoo.flops_per_image, peak, cpu.get("timm"), faults.get("timm")
        )
        row["timm"] = {"first_step_s": runners["timm"].compile_s, **timm_row}
        row["zoo_over_timm"] = row["zoo"]["images_per_s"] / timm_row["images_per_s"]
        row["zoo_over_timm_paired"] = paired_ratio(times["zoo"], times["timm"])
        if settings:
            row["zoo_switched_over_timm"] = (
                row["zoo_switched"]["images_per_s"] / timm_row["images_per_s"]
            )
    return row


def batch_size(case: Case, mode: str, args: argparse.Namespace) -> int:
    explicit = args.train_batch if mode == "train" else args.infer_batch
    if explicit:
        return explicit
    if args.device == "gpu":
        return 256 if mode == "train" else 512
    small = case.size <= 64
    return {("train", False): 16, ("train", True): 128, ("infer", False): 64}.get(
        (mode, small), 256
    )


def markdown(rows: list[dict], meta: dict) -> str:
    util = "MFU" if meta["device"] == "gpu" else "of matmul peak"
    lines = [
        f"{meta['device_kind']}, {meta['precision']}, peak {meta['peak_source']}; "
        f"median img/s (min-max) over {meta['steps']} timed steps, each after "
        f"{meta.get('pause_s', 0):g} s idle; load average "
        f"{meta['load_average'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end; "
        f"XLA_FLAGS={meta.get('xla_flags', '')!r}; inference compiled with "
        f"{meta.get('forward_compiler_options', {})}; allocator: "
        f"{'zoo keeps freed memory' if meta.get('freed_memory_kept') else 'glibc defaults'}",
        "",
        f"| model | mode | batch | zoo img/s | timm img/s | zoo/timm | zoo compile s "
        f"| GFLOP/img | zoo GFLOP/s ({util}) | timm GFLOP/s ({util}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict) -> str:
        return f"{r['images_per_s']:.2f} ({r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f})"

    def util_cell(r: dict) -> str:
        return f"{r['achieved_gflops']:.1f} ({100 * r['utilisation']:.1f}%)"

    for row in rows:
        zoo, timm = row["zoo"], row.get("timm")
        ratio = f"{row['zoo_over_timm']:.2f}x" if timm else "-"
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['batch']} | {cell(zoo)} "
            f"| {cell(timm) if timm else '-'} | {ratio} | {zoo['compile_s']:.1f} "
            f"| {zoo['gflops_per_image']:.2f} | {util_cell(zoo)} "
            f"| {util_cell(timm) if timm else '-'} |"
        )
    switched_rows = [row for row in rows if "zoo_switched" in row]
    if switched_rows:
        lines += [
            "",
            "| model | mode | switches | zoo img/s | zoo img/s, switched | zoo/switched "
            "| zoo/switched, per round | zoo/timm | switched/timm |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for row in switched_rows:
        other = row["zoo_switched"]
        names = ", ".join(f"{k}={v}" for k, v in other["switches"].items())
        over_timm = [row.get(k) for k in ("zoo_over_timm", "zoo_switched_over_timm")]
        lines.append(
            f"| {row['model']} | {row['mode']} | {names} | {cell(row['zoo'])} | {cell(other)} "
            f"| {row['zoo_over_switched']:.2f}x | {row['zoo_over_switched_paired']:.2f}x | "
            + " | ".join(f"{r:.2f}x" if r else "-" for r in over_timm)
            + " |"
        )
    return "\n".join(lines)


def row_argv(argv: list[str], name: str, mode: str, out: str) -> list[str]:
    """This run's options for a child that measures one row: the row selection and the output
    file replaced by `name`, `mode` and `out`."""
    passed, skip = [], False
    for arg in argv:
        if arg in ("--models", "--modes", "--out"):
            skip = True
        elif arg.startswith("--"):
            skip = False
        if not skip and not arg.startswith(("--models=", "--modes=", "--out=")):
            passed.append(arg)
    return [*passed, "--models", name, "--modes", mode, "--out", out]


def row_in_subprocess(name: str, mode: str, argv: list[str] | None) -> dict:
    """One row measured by a fresh `python throughput.py` (`row_argv`): in one long process,
    rows measured after other models read zoo slower (convnext_tiny training 1.92 img/s as
    the 9th row, 2.55 alone; timm 3.28 and 3.12)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        child = row_argv(sys.argv[1:] if argv is None else argv, name, mode, out)
        command = [sys.executable, os.path.abspath(__file__), *child]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["rows"][0]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"]
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16"],
        help="default: fp32 on cpu (no bf16 FMA here), bf16 on gpu",
    )
    parser.add_argument("--train-batch", type=int, default=0, help="0: 16 at 224, 128 at 32")
    parser.add_argument("--infer-batch", type=int, default=0, help="0: 64 at 224, 256 at 32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
    parser.add_argument(
        "--max-warmup",
        type=int,
        default=12,
        help="more untimed steps, up to this many, while steps still fault in fresh memory",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    parser.add_argument("--vs-timm", action="store_true", help="interleave PyTorch/timm")
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="idle seconds before each timed step (one framework's aftermath slows the next)",
    )
    parser.add_argument("--channels-last", action="store_true", help="timm in channels-last")
    parser.add_argument("--matmul-size", type=int, default=4096, help="peak reference (cpu)")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="FIELD[=VALUE]",
        help="also time zoo with these fields of its CPU policy (zoo.cpu.CpuPolicy) changed "
        "(a bool alone: flipped), e.g. attention_vjp winograd=false attention_slices=1; "
        "compiled in the same process and interleaved with the others",
    )
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="measure every row in this process (default: a fresh process per row)",
    )
    args = parser.parse_args(argv)
    try:
        parse_policy_fields(args.compare)
    except ValueError as error:
        parser.error(str(error))
    args.precision = args.precision or ("bf16" if args.device == "gpu" else "fp32")

    device = jax.devices()[0]
    kind = device.device_kind
    if args.device == "cpu":
        peak = matmul_peak(args.matmul_size)
        source = (
            f"= fastest float32 {args.matmul_size}^2 jnp.dot timed in each row's rounds "
            f"({peak / 1e9:.0f} GFLOP/s before the first row)"
        )
    else:
        peak = next((v for k, v in CHIP_PEAK_FLOPS.items() if k in kind), 0.0)
        source = f"datasheet dense bf16 for '{kind}'" if peak else f"unknown chip '{kind}'"
        measured = matmul_peak(8192, jnp.bfloat16)
        source += f"; bf16 8192^2 matmul measured {measured / 1e12:.0f} TFLOP/s"
        peak = peak or measured
    meta = {
        "device": args.device,
        "device_kind": kind,
        "precision": args.precision,
        "peak_gflops": peak / 1e9,
        "peak_source": source,
        "steps": args.steps,
        "pause_s": args.pause,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "timm_memory_format": "channels_last" if args.channels_last else "NCHW",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # incl. zoo's (zoo/cpu/flags.py)
        "forward_compiler_options": cpu.forward_compiler_options(device.platform),
        # glibc: zoo's one arena, no mmap, no trimming (zoo/cpu/allocator.py), timm included
        "freed_memory_kept": cpu.allocator.kept,
    }
    rows = []
    for name in args.models:
        for mode in args.modes:
            if args.same_process or len(args.models) * len(args.modes) == 1:
                rows.append(bench_case(CASES[name], mode, args, peak))
            else:
                rows.append(row_in_subprocess(name, mode, argv))
            print(json.dumps(rows[-1]), flush=True)
    meta["load_average_end"] = os.getloadavg()
    print(markdown(rows, meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
