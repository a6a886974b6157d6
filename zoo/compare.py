"""Architecture comparison: several backbones trained on one dataset with one budget, then a
table and a plot of accuracy against parameters, FLOPs and time.

    python -m zoo.compare --config=configs/compare_fashion_mnist.py --workdir=runs/compare \
        --models=resnet20,vit_nano_patch4_32 [--optim=shared|recipe] [--config.num_epochs=2]

Each model trains with `zoo.training.loop.run` on a copy of the config with `model.name` set,
in <workdir>/<model>/ (checkpoints, metrics, curves, summary.json), each in a fresh Python
process: images/s measured late in one long process read slower (benchmarks/throughput.py runs
each row in its own process for that reason), which would bias the table against the last
models. `--optim=recipe` trains each model with its family's recipe optimizer (`RECIPES`,
`fit_recipe`) instead of the config's; data, augmentation and budget stay the comparison's.

Outputs in --workdir: results.json, results.csv, results.md (model, family, parameters, forward
MFLOPs per image as zoo/models/cost.py counts them, accuracy, train images/s, wall minutes) and
compare.png. Rerunning the same command skips the models that finished and resumes an
interrupted one from its checkpoint (SIGTERM or Ctrl-C stops it with one). The settings are
saved in compare.json: another budget or optimizer into the same workdir is refused rather than
mixed into one table.
"""

from __future__ import annotations

import copy
import csv
import gzip
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs/compare_fashion_mnist.py")
# One small-image model per family (0.3-4 M parameters, 32 px inputs).
DEFAULT_MODELS = ["resnet20", "vit_nano_patch4_32", "swin_nano_patch2_window4_32"]
DEFAULT_MODELS += ["convnext_atto_stem2_32", "efficientnet_b0_stem1_32"]
# A model's family is the module of its class (zoo/models/<family>.py); `--optim=recipe` takes
# the optimizer side of that family's recipe.
RECIPES = {
    "resnet": "configs/resnet50_imagenet.py",
    "efficientnet": "configs/efficientnet_b0_imagenet.py",
    "vit": "configs/deit_small_imagenet.py",
    "swin": "configs/swin_tiny_imagenet.py",
    "convnext": "configs/convnext_tiny_imagenet.py",
}
# Keys that do not change what a model learns: a rerun into the same workdir may change them.
FREE_KEYS = ("checkpoint.", "logging.", "data.num_workers", "data.data_dir", "data.download")
FASHION_MNIST_DOCS = pathlib.Path("/usr/share/doc/dataset-fashion-mnist")


class CompareFailed(RuntimeError):
    """A model's training failed; the exit status is 1 and finished models are kept."""


def family_of(model_name: str) -> str:
    from zoo.models import create_model

    return type(create_model(model_name)).__module__.rsplit(".", 1)[-1]


def fit_recipe(config: Any, recipe: Any, steps_per_epoch: int) -> Any:
    """`config` with the optimizer side of `recipe`: its `optim` and `schedule` sections,
    `method.label_smoothing` and `model.drop_path_rate`. Lengths in epochs (warmup, an
    exponential schedule's decay period) become the same fraction of `config`'s budget as of
    the recipe's `num_epochs`; a recipe lr without `optim.lr_base_batch` is for the recipe's
    batch and is scaled linearly to `config`'s like one with it."""
    if recipe.total_steps or recipe.schedule.get("warmup_steps", 0):
        raise ValueError(
            "--optim=recipe needs a recipe whose lengths are in epochs (num_epochs, "
            "schedule.warmup_epochs), not total_steps or schedule.warmup_steps"
        )
    fitted = copy.deepcopy(config)
    fitted.optim.update(recipe.optim)
    # Gradient accumulation fits the recipe's batch in memory, not the optimizer; an EMA's
    # decay is per step, chosen for the recipe's ~10^5 steps: both stay the comparison's.
    for key in ("grad_accum_steps", "ema_decay"):
        if key in config.optim:
            fitted.optim[key] = config.optim[key]
    if not recipe.optim.lr_base_batch:
        fitted.optim.lr_base_batch = recipe.data.batch_size
    fitted.schedule.update(recipe.schedule)
    budget = config.total_steps / steps_per_epoch if config.total_steps else config.num_epochs
    for key in ("warmup_epochs", "decay_epochs"):
        if key in recipe.schedule:
            fitted.schedule[key] = recipe.schedule[key] * budget / recipe.num_epochs
    fitted.method.label_smoothing = recipe.method.label_smoothing
    fitted.model.drop_path_rate = recipe.model.drop_path_rate
    return fitted


def model_config(config: Any, name: str, optim: str, steps_per_epoch: int) -> Any:
    """The config `name` trains with: `config` with model.name, and for `optim="recipe"` its
    family's recipe optimizer (ValueError naming the families that have one)."""
    from configs.common import load_config_file

    fitted = copy.deepcopy(config)
    fitted.model.name = name
    if optim == "recipe":
        family = family_of(name)
        if family not in RECIPES:
            raise ValueError(
                f"model '{name}' is of family '{family}', which has no recipe; --optim=recipe "
                f"knows {', '.join(sorted(RECIPES))} (zoo.compare.RECIPES)"
            )
        recipe = load_config_file(str(ROOT / RECIPES[family]))
        try:
            fitted = fit_recipe(fitted, recipe, steps_per_epoch)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"recipe {RECIPES[family]} for {name}: {e}") from None
    return fitted


def describe_optimizer(config: Any) -> str:
    optim, base = config.optim, config.optim.lr_base_batch
    lr = optim.lr * config.data.batch_size / base if base else optim.lr
    return f"{optim.name} lr {lr:.3g} wd {optim.weight_decay:g} {config.schedule.name}"


def check_settings(workdir: pathlib.Path, config: Any, optim: str) -> None:
    """Saves the comparison's settings in workdir/compare.json, or, when it has some, refuses
    other ones (ValueError naming the keys)."""

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" != "model.name":
                yield f"{prefix}{key}", value

    settings = json.loads(json.dumps({"optim": optim, **dict(flat(config.to_dict()))}))
    path = workdir / "compare.json"
    if not path.exists():
        path.write_text(json.dumps(settings, indent=2))
        return
    saved = json.loads(path.read_text())
    changed = [
        f"{key}: {saved[key]!r} there, {settings[key]!r} here"
        for key in sorted(saved.keys() & settings.keys())
        if saved[key] != settings[key] and not key.startswith(FREE_KEYS)
    ]
    if changed:
        raise ValueError(
            f"{workdir} holds a comparison with other settings ({'; '.join(changed)}); rerun "
            "with its settings to resume it, or give another --workdir"
        )


def published_best(doc_dir: pathlib.Path = FASHION_MNIST_DOCS) -> tuple[str, float] | None:
    """(classifier, accuracy) of the best "Fashion test accuracy" in the benchmark table of the
    README that the Debian package dataset-fashion-mnist ships (its benchmark/baselines.json
    holds only the scikit-learn search grid, no accuracies); None where absent."""
    path = next((p for p in (doc_dir / "README.md.gz", doc_dir / "README.md") if p.exists()), None)
    if path is None:
        return None
    text = (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8").read()
    best, column = None, None
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if "Fashion test accuracy" in cells:
            column = cells.index("Fashion test accuracy")
        elif column is not None and len(cells) > column:
            try:
                accuracy = float(cells[column])
            except ValueError:
                continue
            best = max(best or (cells[0], accuracy), (cells[0], accuracy), key=lambda b: b[1])
    return best


def train_child(model_dir: str) -> None:
    """The per-model process: `loop.run` on the config the parent left in model_dir."""
    from absl import logging

    from zoo.training import loop

    logging.set_verbosity(logging.WARNING)
    config = pickle.loads((pathlib.Path(model_dir) / "compare_config.pkl").read_bytes())
    try:
        loop.run(config, model_dir)
    except (ValueError, FileNotFoundError, loop.RunFailed) as e:
        print(f"zoo.compare: {config.model.name}: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, loop.RunFailed) else 2)


def train(config: Any, model_dir: pathlib.Path) -> bool:
    """Trains in a fresh process; False when a signal stopped it (resumable). The wall time
    of every attempt adds up in model_dir/compare_wall.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "compare_config.pkl").write_bytes(pickle.dumps(config))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = "import sys; from zoo.compare import train_child; train_child(sys.argv[1])"
    stopped, start = [], time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(model_dir.resolve())], env=env)

    def forward(signum, frame):  # Ctrl-C reaches the child too (same process group)
        stopped.append(signum)
        if signum == signal.SIGTERM:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wall = model_dir / "compare_wall.json"
        seconds = json.loads(wall.read_text())["seconds"] if wall.exists() else 0.0
        wall.write_text(json.dumps({"seconds": seconds + time.perf_counter() - start}))
    if status != 0 and not stopped:
        raise CompareFailed(
            f"training {config.model.name} failed (exit status {status}), see above"
        )
    return not stopped and status == 0


def summary_of(model_dir: pathlib.Path) -> dict[str, Any] | None:
    path = model_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def make_row(name: str, config: Any, parts: Any, model_dir: pathlib.Path) -> dict[str, Any]:
    from zoo.models.cost import forward_flops, parameter_count

    summary = summary_of(model_dir)
    image_shape = parts.example_batch["image"].shape[1:]  # what the model trained on
    wall = json.loads((model_dir / "compare_wall.json").read_text())["seconds"]
    return {
        "model": name,
        "family": family_of(name),
        "params": parameter_count(parts.model, image_shape),
        "mflops": round(forward_flops(parts.model, image_shape) / 1e6, 2),
        "accuracy": summary.get("eval_accuracy"),
        "images_per_second": summary["train_images_per_second"],
        "wall_minutes": round(wall / 60, 2),
        "steps": summary["step"],
        "optimizer": describe_optimizer(config),
    }


def write_outputs(workdir: pathlib.Path, rows: list[dict[str, Any]], title: str) -> None:
    from zoo.training import metrics

    best = published_best() if "fashion_mnist" in title else None
    published = {"name": best[0], "accuracy": best[1]} if best else None
    results = {"title": title, "published_best": published, "rows": rows}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    if not rows:
        return
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "model | family | params | MFLOPs/image | accuracy % | train img/s | wall min"
    lines = [f"# {title}", "", f"| {header} | optimizer |", "|---|---|" + "---:|" * 5 + "---|"]
    for r in rows:
        accuracy = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['params'] / 1e6:.3g} M | {r['mflops']:.1f} | "
            f"{accuracy} | {r['images_per_second']:.0f} | {r['wall_minutes']:.1f} | "
            f"{r['optimizer']} |"
        )
    lines += [
        "",
        "MFLOPs: one eval forward pass of one image (XLA's count, zoo/models/cost.py). Train "
        "img/s: training steps without compilation and evaluation (the last attempt's "
        "summary.json). Wall: every attempt of the model's run, compilation, evaluation and "
        "checkpoints included.",
    ]
    if "fashion_mnist" in title:
        lines.append(
            f"\nPublished best on Fashion-MNIST: {best[0]}, {100 * best[1]:.1f}% (the benchmark "
            f"table of {FASHION_MNIST_DOCS}/README.md.gz; submitted, not verified by its authors)"
            if best
            else "\nPublished Fashion-MNIST benchmark: not found (package dataset-fashion-mnist)"
        )
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    metrics.plot_comparison(rows, workdir / "compare.png", title)


def compare(config: Any, names: list[str], workdir: pathlib.Path, optim: str = "shared") -> bool:
    """Trains each of `names` as `config` says and writes the outputs; False when a signal
    stopped the comparison (rerun to resume)."""
    from zoo.data.datasets import dataset_from_config
    from zoo.models import MODELS
    from zoo.training import loop
    from zoo.training.step import make_mesh

    if optim not in ("shared", "recipe"):
        raise ValueError(f"--optim must be shared or recipe, got '{optim}'")
    for name in names:
        MODELS.get(name)  # an unknown name lists the close matches, before anything trains
    if not names or len(set(names)) < len(names):
        raise ValueError(f"--models needs distinct model names, got {','.join(names)}")
    spec = dataset_from_config(config.data)
    steps_per_epoch, total_steps = loop.schedule_lengths(
        config, len(spec.source("train", config.data))
    )
    configs = {name: model_config(config, name, optim, steps_per_epoch) for name in names}
    workdir.mkdir(parents=True, exist_ok=True)
    check_settings(workdir, config, optim)
    saved = workdir / "results.json"
    rows = {r["model"]: r for r in json.loads(saved.read_text())["rows"]} if saved.exists() else {}
    title = (
        f"{spec.name}: {total_steps} steps of {config.data.batch_size} "
        f"({total_steps / steps_per_epoch:.3g} epochs), {optim} optimizer"
    )

    def finished(name: str) -> bool:
        summary = summary_of(workdir / name)
        return summary is not None and summary["step"] >= total_steps

    # Every model still to train (or to tabulate) is built, and so checked, before any trains.
    mesh = make_mesh()
    todo = [name for name in names if not (finished(name) and name in rows)]
    parts = {name: loop.build(configs[name], spec, mesh) for name in todo}
    for i, name in enumerate(names, 1):
        if name not in parts:
            print(f"zoo.compare: [{i}/{len(names)}] {name}: finished, skipping", flush=True)
            continue
        if not finished(name):
            print(
                f"zoo.compare: [{i}/{len(names)}] {name} ({family_of(name)}, "
                f"{describe_optimizer(configs[name])})",
                flush=True,
            )
            if not train(configs[name], workdir / name):
                write_outputs(workdir, list(rows.values()), title)
                print(f"zoo.compare: stopped in {name}; run the same command again to resume")
                return False
        rows[name] = make_row(name, configs[name], parts[name], workdir / name)
        write_outputs(workdir, list(rows.values()), title)
    write_outputs(workdir, list(rows.values()), title)
    print(f"zoo.compare: results in {workdir / 'results.md'} and {workdir / 'compare.png'}")
    return True


def main() -> None:
    if str(ROOT) not in sys.path:  # config files import `configs.common`
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import app, flags, logging
    from ml_collections import config_flags

    from configs.common import check_overrides, parse_flags

    # ml_collections parses the overrides when the flag is defined: check them first.
    if problem := check_overrides(sys.argv, DEFAULT_CONFIG):
        print(f"zoo.compare: {problem}", file=sys.stderr)
        sys.exit(2)
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Python config file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Output directory; default runs/<config name>_<optim>.")
    flags.DEFINE_list("models", DEFAULT_MODELS, "Comma-separated registry names.")
    flags.DEFINE_enum(
        "optim",
        "shared",
        ["shared", "recipe"],
        "The config's optimizer for all, or each family's recipe's.",
    )

    def run(argv: list[str]) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)
        FLAGS = flags.FLAGS
        name = pathlib.Path(FLAGS["config"].config_filename).stem
        workdir = pathlib.Path(FLAGS.workdir or ROOT / "runs" / f"{name}_{FLAGS.optim}")
        try:
            compare(FLAGS.config, FLAGS.models, workdir, FLAGS.optim)
        except (ValueError, FileNotFoundError, CompareFailed) as e:
            if os.environ.get("ZOO_TRACEBACK"):
                raise
            print(f"zoo.compare: {e}\n(set ZOO_TRACEBACK=1 to see the traceback)", file=sys.stderr)
            sys.exit(1 if isinstance(e, CompareFailed) else 2)

    app.run(run, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
