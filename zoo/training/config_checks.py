"""Checks of the config keys `run` itself reads, before anything is built, read or compiled.

Each failure is a ValueError or FileNotFoundError naming the key, the value and the fix; the
builders (`zoo.training.loop.build`) check their own keys.
"""

from __future__ import annotations

import pathlib
from typing import Any

from zoo.models import MODELS
from zoo.training.checkpoint import latest_checkpoint


def check_batch_layout(config: Any, num_devices: int) -> None:
    """`data.batch_size` against the devices and `optim.grad_accum_steps` (each device's
    share is cut into that many micro-batches): a ValueError naming the numbers and the fix,
    before anything is built. (Evaluation pads its batches to fit any device count.)"""
    steps, batch = config.optim.grad_accum_steps, config.data.batch_size
    if steps < 1:
        raise ValueError(f"optim.grad_accum_steps must be >= 1 (1 = off), got {steps}")
    unit = num_devices * steps
    if batch % unit:
        what = f"{num_devices} device(s)" + (
            f" x optim.grad_accum_steps={steps}" if steps > 1 else ""
        )
        below, above = batch // unit * unit, (batch // unit + 1) * unit
        fits = f"{below} or {above}" if below else str(above)
        raise ValueError(
            f"data.batch_size={batch} does not divide over the {what} ({unit}): set "
            f"data.batch_size to a multiple of {unit}, e.g. {fits}"
            + (", or change optim.grad_accum_steps" if steps > 1 else "")
        )


def check_run_config(config: Any, workdir: pathlib.Path) -> None:
    """The keys `run` itself reads (lengths, intervals, batch sizes, `init_from`), checked
    before anything is built; the builders check theirs (`build`). ValueError or
    FileNotFoundError naming the key, the value and the fix."""
    positive = {
        "data.batch_size": "the global batch over all devices, e.g. 128",
        "data.eval_batch_size": "e.g. 500",
        "checkpoint.every_steps": "steps between checkpoints, e.g. 500",
        "checkpoint.keep": "checkpoints kept, e.g. 3",
        "logging.every_steps": "steps between train metrics, e.g. 50",
    }
    for key, meaning in positive.items():
        section, field = key.split(".")
        if config[section][field] <= 0:
            raise ValueError(f"{key} must be > 0 ({meaning}), got {config[section][field]}")
    if config.evals.every_steps < 0:
        raise ValueError(
            f"evals.every_steps must be >= 0 (0 = once per epoch), got {config.evals.every_steps}"
        )
    if config.total_steps < 0 or (config.total_steps == 0 and config.num_epochs <= 0):
        raise ValueError(
            f"total_steps={config.total_steps}, num_epochs={config.num_epochs}: set "
            "total_steps > 0, or total_steps=0 and num_epochs > 0"
        )
    try:
        if config.init_from_model:
            MODELS.get(config.init_from_model)
    except ValueError as e:  # unknown model 'x'; did you mean: ...
        raise ValueError(f"init_from_model: {e}") from None
    source = pathlib.Path(config.init_from).expanduser()
    if config.init_from and latest_checkpoint(workdir) is None:  # else it resumes instead
        if not source.exists():
            raise FileNotFoundError(
                f"init_from={config.init_from} is neither a zoo workdir nor a file (it does not "
                "exist): give a zoo workdir or a weights file (.safetensors, .pth, .npz), or "
                "unset init_from to train from scratch"
            )
        if source.is_dir() and latest_checkpoint(source) is None:
            raise FileNotFoundError(
                f"init_from={source} is a folder without checkpoints/<step>/; give a zoo "
                "workdir that has trained, or a weights file"
            )
