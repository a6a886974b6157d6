"""Checkpoints with orbax: train state + grain iterator state + config, keep-N, async.

Resume order (DESIGN.md): the latest checkpoint in the workdir, else `init_from`, else scratch.
A run killed at any point restarts from its latest complete checkpoint; orbax never exposes a
half-written one (it writes to a temporary directory and renames it when complete).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from zoo.training.state import TrainState


def latest_checkpoint(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """`<workdir>/checkpoints/<largest step>/state`, or None when there is no complete one."""
    checkpoints = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    steps = [s for s in steps if (checkpoints / str(s) / "state").is_dir()]
    return checkpoints / str(max(steps)) / "state" if steps else None


class Checkpointer:
    """Saves and restores {state, data, config} under `<workdir>/checkpoints/<step>`."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator: Any, config: Any) -> None:
        """Saves asynchronously; the data position is captured now, at the call."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iterator.get_state()),
                config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            ),
        )

    def restore(self, state: TrainState, data_iterator: Any) -> TrainState | None:
        """Restores the latest checkpoint into the structure and shardings of `state`, and
        moves `data_iterator` to the saved position. Returns None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        data_iterator.set_state(restored["data"])
        logging.info("resumed from %s at step %d", self.directory, step)
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
