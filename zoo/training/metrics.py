"""Where metrics go: JSONL + TensorBoard event files, a progress bar, and PNG plots.

With several processes only process 0 writes: on the others the writer, the progress bar and
the plots do nothing (`enabled`, default: whether this is process 0).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm


def is_main_process() -> bool:
    """Whether this is process 0 of the run (the only one when there is one; a process that
    has not imported JAX runs none)."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


class MetricWriter:
    """Appends `{"step": s, "split": name, **scalars}` lines to metrics.jsonl and writes the
    same scalars as TensorBoard summaries (tensorboardX: no TensorFlow needed); nothing when
    not `enabled` (default: on process 0 only). `on_record`, when given, is called with each
    record after it is written (e.g. a notebook's live plot)."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        enabled: bool | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.enabled = is_main_process() if enabled is None else enabled
        self.on_record = on_record
        self.workdir = pathlib.Path(workdir)
        self.jsonl = self.workdir / "metrics.jsonl"
        self.tensorboard = None
        if self.enabled:
            SummaryWriter = summary_writer_class()
            self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def records(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (earlier runs' in this workdir too); [] when not
        enabled (another process may be writing the file)."""
        return read_jsonl(self.jsonl) if self.enabled and self.jsonl.exists() else []

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        record = {"step": step, "split": split, **scalars}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self.tensorboard.add_scalar(f"{split}/{key}", value, step)
        self.tensorboard.flush()
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without PyTorch.

    tensorboardX's writer imports torch whenever it is installed (to accept its tensors);
    here that cost a training run ~2.3 s (5.4 s for a cold import) and ~550 MB of peak memory
    for nothing, since zoo logs Python floats. Unless the process has torch already,
    `import torch` is made to fail for that one import (tensorboardX goes on without it) and
    works again afterwards.
    """
    if "torch" not in sys.modules and "tensorboardX" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # ImportError on import
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A progress bar over steps showing loss, accuracy, images/s and the ETA; with its
    messages, shown only when `enabled` (default: on process 0 only)."""

    def __init__(
        self, total_steps: int, initial_step: int, batch_size: int, enabled: bool | None = None
    ):
        self.batch_size = batch_size
        self.enabled = is_main_process() if enabled is None else enabled
        self.bar = tqdm.tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=1.0,
            disable=not self.enabled,
        )
        self._last = (time.perf_counter(), initial_step)

    def update(self, step: int, scalars: dict[str, float]) -> None:
        now = time.perf_counter()
        last_time, last_step = self._last
        images_per_s = (step - last_step) * self.batch_size / max(now - last_time, 1e-9)
        self._last = (now, step)
        shown = {"loss": f"{scalars.get('loss', float('nan')):.4f}"}
        if "accuracy" in scalars:
            shown["acc"] = f"{scalars['accuracy']:.3f}"
        if "embedding_std" in scalars:  # self-supervised: collapse shows as std -> 0
            shown["std"] = f"{scalars['embedding_std']:.3f}"
        self.bar.set_postfix(**shown, img_s=f"{images_per_s:.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


ACCURACY_KEYS = {"accuracy": "", "knn_accuracy": "k-NN", "linear_probe_accuracy": "linear probe"}


def plot_curves(records: list[dict[str, Any]], path: str | pathlib.Path) -> None:
    """Train/eval loss and accuracy (a classifier's, and the k-NN and linear-probe accuracy
    of feature evaluators) against step, from metrics.jsonl records (process 0 only)."""
    if not is_main_process():
        return
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    panels = (({"loss": ""}, "loss"), (ACCURACY_KEYS, "top-1 accuracy"))
    for ax, (keys, title) in zip(axes, panels, strict=True):
        for key, name in keys.items():
            for split, style in (("train", "-"), ("eval", "o-")):
                points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
                if points:
                    steps, values = zip(*points, strict=True)
                    label = f"{split} {name}".strip()
                    ax.plot(steps, values, style, label=label, markersize=4)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | pathlib.Path, title: str = ""
) -> None:
    """Row-normalised confusion matrix [true, predicted] with counts, labelled by class
    (process 0 only)."""
    if not is_main_process():
        return
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(6, 0.6 * len(class_names))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if len(class_names) <= 30:
        for i, j in np.ndindex(matrix.shape):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_comparison(rows: list[dict[str, Any]], path: str | pathlib.Path, title: str = "") -> None:
    """Eval accuracy against wall minutes and against parameters (log scale), one labelled
    point per model, coloured by family: `python -m zoo.compare`'s rows (`model`, `family`,
    `accuracy`, `wall_minutes`, `params`)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("accuracy") is not None]
    families = sorted({r["family"] for r in rows})
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    panels = (("wall_minutes", "wall time (min)", "linear"), ("params", "parameters", "log"))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for r in rows:
            point = (r[key], 100 * r["accuracy"])
            ax.scatter(*point, color=f"C{families.index(r['family']) % 10}")
            ax.annotate(r["model"], point, xytext=(4, 4), textcoords="offset points", fontsize=8)
        ax.set(xlabel=label, ylabel="eval accuracy (%)", xscale=scale)
        if scale == "log":  # "0.3 M" at round values, instead of overlapping 10^x labels
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(lambda value, _: f"{value / 1e6:g} M")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
