"""`run(config, workdir)`: mesh -> data -> model/method -> state -> steps -> eval -> ckpt.

The loop only moves data and decides when to log, evaluate and checkpoint; all math is in
the compiled step. Host syncs happen only at logging, evaluation and checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo import cpu
from zoo.data import pipeline
from zoo.data.augment import augment_from_config, image_keys, make_augment
from zoo.data.datasets import dataset_from_config
from zoo.data.transforms import build_ops
from zoo.methods import METHODS
from zoo.methods.base import View
from zoo.models import MODELS, check_input_size, create_model, model_entry
from zoo.models.registry import config_overrides
from zoo.training import ema as ema_lib
from zoo.training import metrics as metrics_lib
from zoo.training.checkpoint import Checkpointer, CheckpointError
from zoo.training.config_checks import check_batch_layout, check_run_config
from zoo.training.evaluate import evaluator_names, run_evaluators
from zoo.training.init_from import load_init_from
from zoo.training.optim import build_optimizer
from zoo.training.preemption import StopSignals
from zoo.training.state import TrainState
from zoo.training.step import Parallel, make_mesh, shardings


class RunFailed(RuntimeError):
    """The run cannot go on (diverged; no usable checkpoint): train.py exits 1 with the message."""


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(config: Any, num_classes: int, axis_name: str | None = None):
    """The registry model of `config.model`; `axis_name` (pmap) reaches its BatchNorm
    statistics and its per-example dropout keys (zoo/parallel.py)."""
    name, dtype = config.model.name, config.model.dtype
    if dtype not in DTYPES:
        raise ValueError(
            f"model.dtype must be one of {', '.join(DTYPES)}, got '{dtype}' (the compute "
            "dtype; parameters stay float32)"
        )
    overrides = config_overrides(config.model.to_dict())
    MODELS.get(name)  # an unknown name lists the close matches
    try:
        if axis_name is not None:
            overrides["axis_name"] = axis_name
        return create_model(name, num_classes=num_classes, dtype=DTYPES[dtype], **overrides)
    except ValueError as e:  # a field's own check, e.g. ResNet's stem
        if str(e).startswith("model '"):
            raise
        raise ValueError(f"model '{name}': {e}") from None


def is_classifier(config: Any) -> bool:
    """Whether `config.method.name` trains a classifier (else a feature learner, whose model
    is built with num_classes=0); an unknown name lists the close matches."""
    METHODS.get(config.method.name)
    return METHODS.metadata(config.method.name)["classifier"]


def build_method(config: Any, model, spec, *, steps_per_epoch: int = 1, total_steps: int = 1):
    """The method `config.method.name` (zoo/methods/) on `model`, checked against the dataset
    and the evaluators before anything is compiled."""
    evaluator_names(config.evals.names)  # an unknown evaluator fails here
    threshold, smoothing = config.method.threshold, config.method.label_smoothing
    if not 0.0 < threshold < 1.0:
        raise ValueError(
            f"method.threshold={threshold} must be in (0, 1): the probability at or above which a "
            "sigmoid output counts as positive (default 0.5)"
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(
            f"method.label_smoothing={smoothing} must be in [0, 1) (0 = off; 0.1 is usual)"
        )
    if not is_classifier(config) and config.init_from:
        raise ValueError(
            f"init_from starts a classifier from weights; method '{config.method.name}' "
            "pretrains from scratch: unset init_from, or fine-tune this run's workdir later "
            "with method.name=supervised and init_from=<this workdir>"
        )
    builder = METHODS.get(config.method.name)
    return builder(config, model, spec, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def format_metrics(results: dict[str, Any]) -> str:
    """'accuracy 0.9120, f1 0.8800, ...': the scalar eval metrics of any task, for the log
    (and how many examples had non-finite logits, when any did); the EMA's `ema_*` too."""
    skip = ("confusion", "count", "nonfinite", "linear_probe_train_accuracy")
    text = ", ".join(
        f"{k} {v:.4f}" for k, v in results.items() if k.removeprefix("ema_") not in skip
    )
    if results.get("nonfinite"):
        text += f" ({results['nonfinite']} of {results['count']} examples: non-finite logits)"
    return text


def is_nonfinite(metrics: dict[str, Any]) -> bool:
    """Whether a step's loss or gradient norm (host values) is NaN or infinite."""
    return not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))


class NonFiniteGuard:
    """Checks each step's loss and gradient norm (the train step's metrics, read on the host
    at logging, evaluation and checkpoint steps, before any checkpoint is written).

    By default the first non-finite step stops the run (`RunFailed`: the step, the loss and
    gradient norm, the last checkpoint, which is intact); with `optim.skip_nonfinite` the step
    skipped those updates, and the run stops only after more than `max_skipped` in a row.
    """

    def __init__(self, skip: bool, max_skipped: int, checkpointer: Checkpointer):
        self.skip, self.max_skipped, self.checkpointer = skip, max_skipped, checkpointer
        self.total = self.in_row = 0

    def check(self, first_step: int, values: list[dict[str, Any]]) -> None:
        """`values`: the host metrics of steps first_step, first_step + 1, ..."""
        for step, metrics in enumerate(values, start=first_step):
            if not is_nonfinite(metrics):
                self.in_row = 0
                continue
            self.total, self.in_row = self.total + 1, self.in_row + 1
            if self.skip and self.in_row <= self.max_skipped:
                continue
            what = (
                f"step {step}: loss {float(metrics['loss']):.4g}, gradient norm "
                f"{float(metrics['grad_norm']):.4g}"
            )
            self.checkpointer.wait()
            last = self.checkpointer.latest_step()
            kept = (
                f"The last checkpoint, step {last} in {self.checkpointer.directory}, is intact"
                if last is not None
                else "No checkpoint was written before it"
            )
            if self.skip:
                raise RunFailed(
                    f"{self.in_row} updates in a row had a non-finite loss or gradient (more "
                    f"than optim.max_skipped={self.max_skipped}), the last at {what}. {kept}. "
                    "Lower optim.lr or set optim.grad_clip_norm."
                )
            raise RunFailed(
                f"the run diverged at {what} (not finite). {kept}. Lower optim.lr (it was "
                f"{float(metrics['lr']):.4g} at that step), set optim.grad_clip_norm, or set "
                "optim.skip_nonfinite=True to skip such updates."
            )

    def window_means(self, window: list[dict[str, Any]]) -> dict[str, float]:
        """Mean of each train metric over the window's steps that were not skipped (all of
        them when every one was), plus `nonfinite`: the fraction skipped."""
        kept = [m for m in window if not is_nonfinite(m)] or window
        means = {k: float(np.mean([m[k] for m in kept])) for k in window[0]}
        means["nonfinite"] = float(np.mean([is_nonfinite(m) for m in window]))
        return means


def schedule_lengths(config: Any, train_size: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) from `total_steps` or `num_epochs`."""
    steps_per_epoch = max(train_size // config.data.batch_size, 1)
    total = config.total_steps or math.ceil(config.num_epochs * steps_per_epoch)
    return steps_per_epoch, int(total)


def init_state(method, tx, example_batch, augment, rng, mesh, ema: bool = False) -> TrainState:
    """The initial state as global replicated arrays (`Parallel.put_state` lays it out for
    the train step), with an EMA of the weights (zoo/training/ema.py) when `ema`."""
    replicated, _ = shardings(mesh)

    def init(rng):
        params, model_state, extra = method.init(rng, augment(example_batch, rng))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            extra=extra,
            ema=ema_lib.init_ema(params, model_state) if ema else None,
        )

    # Runs once: compiled for compile time (same parameters, `cpu.once_compiler_options`).
    devices = mesh.devices.ravel().tolist()
    options = cpu.once_compiler_options(devices[0].platform)
    init = cpu.traced(init, cpu.policy_for(devices))
    return jax.jit(init, out_shardings=replicated, compiler_options=options)(rng)


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a config builds before any state exists (`build`); `init(rng)` makes the state."""

    model: Any
    method: Any
    tx: Any
    schedule: Any
    augment: Any
    example_batch: dict[str, Any]
    parallel: Parallel
    steps_per_epoch: int
    total_steps: int
    train_size: int
    evals: list[str]
    ema_decay: float = 0.0  # optim.ema_decay; the state has an EMA when > 0
    ema_warmup: bool = True

    def init(self, rng: jax.Array) -> TrainState:
        mesh, ema = self.parallel.mesh, self.ema_decay > 0
        return init_state(self.method, self.tx, self.example_batch, self.augment, rng, mesh, ema)


def build(config: Any, spec: Any, mesh: Any) -> Parts:
    """Model, method, optimizer and device augmentation of `config` on dataset `spec`, all
    checked before anything is compiled (used by `run` and by `python -m zoo.evaluate`)."""
    parallel = Parallel(mesh, config.parallel.mode)  # an unknown mode fails here
    num_classes = spec.num_classes if is_classifier(config) else 0
    model = build_model(config, num_classes, parallel.axis_name)
    train_size = len(spec.source("train", config.data))
    steps_per_epoch, total_steps = schedule_lengths(config, train_size)
    method = build_method(
        config, model, spec, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    ema_lib.check_ema_decay(config.optim.ema_decay)
    tx, schedule = build_optimizer(
        config.optim,
        config.schedule,
        total_steps,
        steps_per_epoch,
        head=model_entry(config.model.name).head,
        batch_size=config.data.batch_size,
    )
    augment = augment_from_config(
        config.data, spec, config.method.label_smoothing, views=method.views
    )
    for key in ("data.train_ops", "data.eval_ops"):  # eval ops are used only at the first eval
        build_ops(config.data[key.split(".")[1]], key=key)
    example_batch = pipeline.example_batch(spec, config.data, method.views)
    eval_example = pipeline.example_batch(spec, config.data, [View("image", config.data.eval_ops)])
    for split, batch in (("training", example_batch), ("eval", eval_example)):
        for key in image_keys(batch):
            height, width = batch[key].shape[1:3]
            try:
                check_input_size(model, height, width)
            except ValueError as e:
                view = "" if key == "image" else f" ({key})"
                raise ValueError(
                    f"model '{config.model.name}' cannot take the {height}x{width} {split} "
                    f"images{view} of {spec.name}: {e}. Change the model (e.g. "
                    "model.patch_size) or the image size (data.train_ops and data.eval_ops, "
                    "e.g. 'resize(size=32)')"
                ) from None
    return Parts(
        model=model,
        method=method,
        tx=tx,
        schedule=schedule,
        augment=augment,
        example_batch=example_batch,
        parallel=parallel,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        train_size=train_size,
        evals=evaluator_names(config.evals.names),
        ema_decay=config.optim.ema_decay,
        ema_warmup=config.optim.ema_warmup,
    )


def run(
    config: Any,
    workdir: str | pathlib.Path,
    *,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains and evaluates as `config` says; returns the final eval metrics.

    Args:
      config: the run config (configs/*.py).
      workdir: where checkpoints, metrics, plots and the summary go; a workdir with a
        checkpoint resumes from it.
      on_metrics: called on process 0 with each record as it is appended to metrics.jsonl,
        in order: `{"step", "split": "train" | "eval", **scalars}` (train: means since the
        last log; eval: the evaluators' metrics), e.g. to plot live in a notebook. An
        exception it raises stops the run.
    """
    workdir = pathlib.Path(workdir)
    check_run_config(config, workdir)  # before anything is built, read or compiled
    mesh = make_mesh()
    Parallel(mesh, config.parallel.mode)  # an unknown mode fails before anything is read
    check_batch_layout(config, mesh.size)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = dataset_from_config(config.data)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    chief = jax.process_index() == 0  # prints, metric files and plots

    parts = build(config, spec, mesh)
    method, tx, augment, evals = parts.method, parts.tx, parts.augment, parts.evals
    parallel = parts.parallel
    steps_per_epoch, total_steps = parts.steps_per_epoch, parts.total_steps
    train_iter = pipeline.train_iterator(
        spec, config.data, seed=config.seed, views=method.views, **process
    )
    eval_augment = make_augment(spec.mean, spec.std)  # normalisation only
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = parts.init(init_rng)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    checkpointer = Checkpointer(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    try:  # resume order: workdir, init_from, scratch
        restored = checkpointer.restore(state, train_iter, config)
    except CheckpointError as e:
        checkpointer.close()
        raise RunFailed(str(e)) from None
    state = restored if restored is not None else state
    init_message = ""
    if restored is None and config.init_from:
        params, model_state, reinit = load_init_from(config, parts.model, state)
        ema = None if state.ema is None else ema_lib.init_ema(params, model_state)
        state = jax.device_put(
            state.replace(
                params=params, model_state=model_state, opt_state=tx.init(params), ema=ema
            ),
            shardings(mesh)[0],
        )
        init_message = f"; initialised from {config.init_from}" + (
            f" (re-initialised the classifier head for {spec.num_classes} class"
            f"{'es' if spec.num_classes > 1 else ''}: {', '.join(reinit)})"
            if reinit
            else ""
        )
    step = int(np.asarray(state.step.addressable_data(0)))
    if chief:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    state = parallel.put_state(state)  # pmap: one copy per device

    train_step = parallel.compile_train_step(
        method=method,
        tx=tx,
        augment=augment,
        schedule=parts.schedule,
        skip_nonfinite=config.optim.skip_nonfinite,
        grad_accum_steps=config.optim.grad_accum_steps,
        ema_decay=parts.ema_decay,
        ema_warmup=parts.ema_warmup,
    )
    eval_step = parallel.compile_eval_step(method=method, augment=eval_augment)
    features_step = parallel.compile_eval_step(
        method=method, augment=eval_augment, output="features"
    )
    writer = metrics_lib.MetricWriter(workdir, on_record=on_metrics)
    eval_every = config.evals.every_steps or steps_per_epoch
    log_every = config.logging.every_steps

    eval_seconds = 0.0

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal eval_seconds
        start = time.perf_counter()
        results = run_evaluators(
            evals,
            state,
            spec=spec,
            config=config,
            eval_step=eval_step,
            features_step=features_step,
            parallel=parallel,
            **process,
        )
        writer.write(step, "eval", {k: v for k, v in results.items() if k != "confusion"})
        eval_seconds += time.perf_counter() - start
        return results

    say = print if chief else lambda *_: None
    say(
        f"zoo: {config.model.name} ({num_params:,} params) on {spec.name} "
        f"({parts.train_size:,} train images), {total_steps} steps of {config.data.batch_size} "
        f"on {mesh.size} {jax.devices()[0].platform} device(s) ({parallel.mode}"
        + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f"); workdir {workdir}"
        + (f"; resumed at step {step}" if restored is not None else "")
        + init_message
    )
    progress = metrics_lib.Progress(total_steps, step, config.data.batch_size)
    guard = NonFiniteGuard(config.optim.skip_nonfinite, config.optim.max_skipped, checkpointer)
    pending, window, results, first_step = [], [], None, step
    compile_seconds, train_start = None, time.perf_counter()
    # From here on SIGTERM/SIGINT stop the run with a checkpoint (zoo/training/preemption.py);
    # after the loop they only let it finish.
    with StopSignals(jax.process_count()) as stop:
        # The next batches are made and copied to the device in a thread while the step runs.
        batches = pipeline.Prefetch(train_iter, parallel.put_batch)
        try:
            while step < total_steps:
                batch = next(batches)
                if compile_seconds is None:  # compile ahead of time once, to time it
                    start = time.perf_counter()
                    train_step = train_step.lower(state, batch, step_rng).compile()
                    compile_seconds = time.perf_counter() - start
                state, step_metrics = train_step(state, batch, step_rng)
                step += 1
                # Read on the host only when needed below; the copy starts now.
                step_metrics = parallel.local_copy(step_metrics)
                jax.tree.map(lambda x: x.copy_to_host_async(), step_metrics)
                pending.append(step_metrics)
                # At most two steps in flight: with dozens queued, XLA:CPU's collectives over
                # several devices deadlocked (SPEED.md, "Scale"); elsewhere it costs nothing.
                if len(pending) > 2:
                    jax.block_until_ready(pending[-3])
                log = step % log_every == 0 or step == total_steps
                evaluate = evals and (step % eval_every == 0 or step == total_steps)
                save = step % config.checkpoint.every_steps == 0 or step == total_steps
                stopping = stop.requested(step)
                if log or evaluate or save or stopping:
                    values = parallel.host(pending)
                    guard.check(step - len(values) + 1, values)  # before anything is saved
                    window, pending = window + values, []
                if log:
                    scalars = guard.window_means(window)
                    writer.write(step, "train", scalars)
                    progress.update(step, scalars)
                    window = []
                if evaluate and not stopping:
                    results = run_eval(step)
                    progress.write(f"step {step}: eval {format_metrics(results)}")
                if save or stopping:
                    checkpointer.save(step, parallel.get_state(state), batches, config)
                if stopping:
                    break
        finally:
            progress.close()
            batches.close()  # stops the thread and grain's worker processes, if any
            checkpointer.wait()  # a failed run still completes its last good checkpoint
        train_seconds = time.perf_counter() - train_start
        if stop.received:
            checkpointer.close()
            writer.close()
            say(
                f"zoo: stopped by {stop.received} at step {step} of {total_steps}; checkpoint "
                f"saved in {checkpointer.directory / str(step)}. Run the same command again to "
                "resume."
            )
            return {}

        if results is None and evals:  # resumed at the end: evaluate the restored state
            results = run_eval(step)
        results = results or {}
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        metrics_lib.plot_curves(writer.records(), workdir / "curves.png")
        if "confusion" in results:  # multiclass and binary
            metrics_lib.plot_confusion_matrix(
                results["confusion"],
                spec.names(config.data),
                workdir / "confusion_matrix.png",
                title=f"{config.model.name} on {spec.name}: accuracy {results['accuracy']:.2%}",
            )
        summary = {
            "step": step,
            **{f"eval_{k}": v for k, v in results.items() if k != "confusion"},
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(eval_seconds, 1),
            "compile_seconds": round(compile_seconds, 1) if compile_seconds else None,
            # Steps of this invocation, excluding compilation and evaluation.
            "train_images_per_second": round(
                (step - first_step)
                * config.data.batch_size
                / max(train_seconds - eval_seconds - (compile_seconds or 0.0), 1e-9),
                1,
            ),
            "freed_memory_kept": cpu.allocator.kept,  # zoo's allocator settings in effect
            "skipped_nonfinite_updates": guard.total,  # this invocation's (optim.skip_nonfinite)
        }
        if chief:
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        if results:
            say(
                f"final eval on {results['count']} images: {format_metrics(results)} "
                f"({method.name}, {spec.task}); outputs in {workdir}"
            )
        else:
            say(f"done at step {step} (evals.names is empty); outputs in {workdir}")
        if guard.total:
            say(f"skipped {guard.total} update(s) with a non-finite loss or gradient")
        logging.info("summary: %s", summary)
        return results
