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

With several processes (zoo/training/distributed.py) they write one checkpoint together
(orbax writes each array once; the JSON items on process 0), which holds every process's data
position. Restoring, all processes take the same decision for each step (a step unusable on
one is unusable on all), and only process 0 moves damaged ones aside while the others wait.
A checkpoint resumes with the number of processes that wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import sys
from typing import Any

import jax
import numpy as np

from zoo.training.state import TrainState


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir can be restored (each one's problem is in the message)."""


def latest_checkpoint(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """`<workdir>/checkpoints/<largest step>/state`, or None when there is no complete one."""
    checkpoints = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    steps = [s for s in steps if (checkpoints / str(s) / "state").is_dir()]
    return checkpoints / str(max(steps)) / "state" if steps else None


def stored_arrays(checkpoint: pathlib.Path) -> Any:
    """The tree of a checkpoint's array metadata (`.shape`, `.dtype`), read without the arrays."""
    import orbax.checkpoint as ocp

    # orbax logs that an item of a composite checkpoint has no step metadata of its own: noise
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return ocp.PyTreeCheckpointer().metadata(checkpoint.absolute()).item_metadata.tree
    finally:
        absl_logger.setLevel(level)


def restore_on_this_host(checkpoint: pathlib.Path, items: tuple[str, ...] | None = None) -> Any:
    """A checkpoint's arrays (all, or only its top-level `items`), whole, on this process's
    first device, whatever devices and processes wrote it (without a target, orbax would want
    the writers' topology). Fine-tuning (`init_from`) and `zoo.load_classifier` read with it."""
    import orbax.checkpoint as ocp

    stored = stored_arrays(checkpoint)
    if items is not None:
        stored = {key: stored[key] for key in items if key in stored}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
    return ocp.PyTreeCheckpointer().restore(
        checkpoint.absolute(),
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=items is not None,
        ),
    )


def state_tree(state: TrainState) -> dict[str, Any]:
    """The train state as checkpoints store it: a dict of its fields, without `ema` when that
    is None. orbax would store a None field as an entry of its own, and a checkpoint without
    it (a run without EMA, or written before EMA existed) would then no longer restore."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if fields["ema"] is None:
        del fields["ema"]
    return fields


def train_state(tree: dict[str, Any]) -> TrainState:
    """`state_tree`'s dict -> the TrainState."""
    return TrainState(**tree)


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
        import orbax.checkpoint as ocp  # here, not at import: zoo.inference imports this module

        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        partial = sorted(p.name for p in self.directory.glob("*.orbax-checkpoint-tmp*"))
        if partial and jax.process_index() == 0:
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
        import orbax.checkpoint as ocp

        if jax.process_count() == 1:
            # One copy to save: orbax splits a replicated array into one slice per device to
            # write them in parallel, compiling a slice for each shape, all to the same memory
            # (SPEED.md, "Recipes, EMA and the comparison").
            state = jax.device_put(state, jax.local_devices()[0])
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_tree(state)),
                data=ocp.args.JsonSave(data_position(data_iterator)),
                config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                digest=ocp.args.JsonSave({"state": state_digest(state)}),
            ),
        )

    def restore(self, state: TrainState, data_iterator: Any, config: Any) -> TrainState | None:
        """Restores the latest usable checkpoint into the structure and shardings of `state`
        and moves `data_iterator` to its position; None when the workdir has no checkpoint.

        Raises:
          CheckpointError: there are checkpoints but none can be restored.
          ValueError: the latest usable checkpoint was written by another number of processes.
        """
        import orbax.checkpoint as ocp

        steps = sorted(self.manager.all_steps(), reverse=True)
        abstract = state_tree(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        problems: list[str] = []
        for step in steps:
            problem = None
            try:
                restored = self._restore_step(step, abstract, data_iterator, config)
            except WrongProcessCount:
                raise
            except Exception as error:  # noqa: BLE001 - any failure makes this step unusable
                problem = error.args[0] if isinstance(error, _Unusable) else _short(error)
            if not all_processes_agree(problem is None):
                problem = problem or "unusable on another process (its log says why)"
                problems.append(f"step {step}: {problem}")
                _say(f"zoo: checkpoint {step} is unusable ({problem})")
                continue
            if problems:
                moved = self._move_aside([s for s in steps if s > step])
                _say(
                    f"zoo: resuming from the previous usable checkpoint, step {step}; the "
                    f"unusable ones are in {moved}"
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
        import orbax.checkpoint as ocp

        has_digest = (self.directory / str(step) / "digest").is_dir()  # older zoo: none
        args = dict(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        if has_digest:
            args["digest"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception:
            self._check_ema(step, abstract)  # the likeliest difference, named with its key
            raise
        state = train_state(restored["state"])
        saved = restored["config"]
        for key in ("model", "method"):
            theirs, ours = saved.get(key, {}).get("name"), config[key].name
            if theirs != ours:
                raise _Unusable(
                    f"written by a run of {key} '{theirs}', this config's {key} is '{ours}'"
                )
        if has_digest and state_digest(state) != restored["digest"]["state"]:
            raise _Unusable(
                "its arrays do not match the digest saved with them (damaged or overwritten files)"
            )
        data_iterator.set_state(own_data_position(restored["data"], step, self.directory))
        return state

    def _check_ema(self, step: int, abstract: dict[str, Any]) -> None:
        """_Unusable when checkpoint `step` has an EMA of the weights and this run not, or
        the other way round (`optim.ema_decay` changed between the runs)."""
        try:
            stored = "ema" in stored_arrays(self.directory / str(step) / "state")
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore error says more
            return
        if stored != ("ema" in abstract):
            which = (
                "with an EMA of the weights and this run has none"
                if stored
                else "without an EMA of the weights and this run has one"
            )
            raise _Unusable(
                f"written {which} (optim.ema_decay): resume with the optim.ema_decay of the run "
                "that wrote it"
            )

    def _move_aside(self, steps: list[int]) -> pathlib.Path:
        """Moves unusable checkpoints out of orbax's sight (kept for a post-mortem), so the
        run can write those steps again: process 0 moves them, the others wait for it."""
        target = self.workdir / "damaged_checkpoints"
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
            for step in steps:
                destination = target / str(step)
                if destination.exists():
                    shutil.rmtree(destination)
                shutil.move(str(self.directory / str(step)), destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("zoo: damaged checkpoints moved aside")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class _Unusable(Exception):
    """A checkpoint read without error that still cannot be used (its message says why)."""


class WrongProcessCount(ValueError):
    """A checkpoint written by another number of processes than this run has."""


def _say(message: str) -> None:
    """A message on stderr, from process 0 only (every process takes the same decisions)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr)


def all_processes_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (just `ok` with one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def data_position(data_iterator: Any) -> Any:
    """What a checkpoint saves of the data: the iterator's state, or with several processes
    {"process_states": [each process's state]} (orbax writes JSON from process 0 only)."""
    state = data_iterator.get_state()
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    text = np.frombuffer(json.dumps(state).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.int32(len(text)))))
    padded = np.zeros(longest, np.uint8)
    padded[: len(text)] = text
    texts = multihost_utils.process_allgather(padded)  # [processes, longest]
    states = [json.loads(bytes(row).rstrip(b"\0")) for row in texts]
    return {"process_states": states}


def own_data_position(saved: Any, step: int, directory: pathlib.Path) -> Any:
    """This process's data iterator state in a checkpoint's `data` item (`data_position`).

    Raises:
      WrongProcessCount: it was saved by another number of processes (each process's
        position counts its own rows: it does not carry over to another split).
    """
    count, index = jax.process_count(), jax.process_index()
    states = saved.get("process_states") if isinstance(saved, dict) else None
    written_by = 1 if states is None else len(states)
    if written_by != count:
        raise WrongProcessCount(
            f"checkpoint {step} in {directory} was written by {written_by} process(es) and "
            f"this run has {count}: resume it with {written_by} (parallel.num_processes="
            f"{written_by}, or as many cluster tasks), or use another --workdir"
        )
    return saved if states is None else states[index]
