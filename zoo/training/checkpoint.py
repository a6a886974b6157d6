"""Checkpoints with orbax: train state + grain iterator state + config + digest, keep-N, async.

Resume order (DESIGN.md): the latest usable checkpoint in the workdir, else `init_from`, else
scratch. What makes that safe:
- A run killed at any moment (even mid-write) leaves no half checkpoint behind a step number:
  orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when complete; such
  leftovers are removed (and named) when the next run starts.
- Damage after the write (a truncated or missing file, flipped bytes, another run's config) is
  found at restore: by orbax/TensorStore's read errors, by a digest of every array saved with
  them (TensorStore does not checksum: flipped bytes would load as other numbers), and by
  the saved config's model and method. An unusable checkpoint is named with its problem and
  moved to `<workdir>/damaged_checkpoints/`, and the previous one is tried; when none is
  usable the run stops (`CheckpointError`) rather than start over silently.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from zoo.training.state import TrainState


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir can be restored (each one's problem is in the message)."""


def latest_checkpoint(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """`<workdir>/checkpoints/<largest step>/state`, or None when there is no complete one."""
    checkpoints = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    steps = [s for s in steps if (checkpoints / str(s) / "state").is_dir()]
    return checkpoints / str(max(steps)) / "state" if steps else None


def state_digest(state: Any) -> str:
    """blake2b of every array of `state` (path, dtype, shape and bytes, in tree order).

    Reads this process's copy of each array (the train state is replicated), so it costs one
    device -> host copy of the state per checkpoint.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array):
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _short(error: BaseException) -> str:
    """A one-line description of a restore error (TensorStore's run over many lines)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


class Checkpointer:
    """Saves and restores {state, data, config, digest} under `<workdir>/checkpoints/<step>`."""

    ITEMS = ("state", "data", "config", "digest")

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        partial = sorted(p.name for p in self.directory.glob("*.orbax-checkpoint-tmp*"))
        if partial:
            print(
                f"zoo: removing {len(partial)} incomplete checkpoint write(s) of an interrupted "
                f"run: {', '.join(partial)}",
                file=sys.stderr,
            )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,
            ),
            item_names=self.ITEMS,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator: Any, config: Any) -> None:
        """Saves asynchronously; the data position and the digest are taken now, at the call."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iterator.get_state()),
                config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                digest=ocp.args.JsonSave({"state": state_digest(state)}),
            ),
        )

    def restore(self, state: TrainState, data_iterator: Any, config: Any) -> TrainState | None:
        """Restores the latest usable checkpoint into the structure and shardings of `state`
        and moves `data_iterator` to its position; None when the workdir has no checkpoint.

        Raises:
          CheckpointError: there are checkpoints but none can be restored.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        problems: list[str] = []
        for step in steps:
            try:
                restored = self._restore_step(step, abstract, data_iterator, config)
            except Exception as error:  # noqa: BLE001 - any failure makes this step unusable
                problem = error.args[0] if isinstance(error, _Unusable) else _short(error)
                problems.append(f"step {step}: {problem}")
                print(f"zoo: checkpoint {step} is unusable ({problem})", file=sys.stderr)
                continue
            if problems:
                moved = self._move_aside([s for s in steps if s > step])
                print(
                    f"zoo: resuming from the previous usable checkpoint, step {step}; the "
                    f"unusable ones are in {moved}",
                    file=sys.stderr,
                )
            return restored
        if problems:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}:\n  "
                + "\n  ".join(problems)
                + "\nThe run stopped rather than start over. If these checkpoints belong to "
                "another run, use another --workdir; to start from scratch here, move "
                f"{self.directory} away."
            )
        return None

    def _restore_step(self, step: int, abstract: Any, data_iterator: Any, config: Any) -> Any:
        has_digest = (self.directory / str(step) / "digest").is_dir()  # older zoo: none
        args = dict(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        if has_digest:
            args["digest"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        saved = restored["config"]
        for key in ("model", "method"):
            theirs, ours = saved.get(key, {}).get("name"), config[key].name
            if theirs != ours:
                raise _Unusable(
                    f"written by a run of {key} '{theirs}', this config's {key} is '{ours}'"
                )
        if has_digest and state_digest(restored["state"]) != restored["digest"]["state"]:
            raise _Unusable(
                "its arrays do not match the digest saved with them (damaged or overwritten files)"
            )
        data_iterator.set_state(restored["data"])
        return restored["state"]

    def _move_aside(self, steps: list[int]) -> pathlib.Path:
        """Moves unusable checkpoints out of orbax's sight (kept for a post-mortem), so the
        run can write those steps again."""
        target = self.workdir / "damaged_checkpoints"
        target.mkdir(exist_ok=True)
        for step in steps:
            destination = target / str(step)
            if destination.exists():
                shutil.rmtree(destination)
            shutil.move(str(self.directory / str(step)), destination)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class _Unusable(Exception):
    """A checkpoint read without error that still cannot be used (its message says why)."""
