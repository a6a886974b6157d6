"""`load_classifier`: a `Classifier` from a training workdir or from pretrained weights.

    classifier = load_classifier("runs/default")  # what `train.py --workdir` wrote
    classifier = load_classifier("lite0.pth", model="tf_efficientnet_lite0")  # timm weights

A workdir gives everything the run knew (`config.json` and the latest
`checkpoints/<step>/state`): the model and its number of classes, the task (multiclass:
softmax; binary: one logit, sigmoid; multilabel: a sigmoid per label), the class names, the
decision threshold (`method.threshold`) and the eval preprocessing of the dataset. When the
run kept an exponential moving average of its weights (`optim.ema_decay`), the classifier
uses it, as the recipes that train one report it; `weights="raw"` takes the last trained
weights instead. A weights file gives an ImageNet classifier with the preprocessing of its
pretrained metadata.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from zoo.data.class_names import load_class_names
from zoo.inference.classifier import Classifier, Preprocessing
from zoo.models.registry import PretrainedConfig, config_overrides, create_model, model_entry
from zoo.models.weights import load_pretrained
from zoo.training.checkpoint import latest_checkpoint, restore_on_this_host, stored_arrays


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
    }


WEIGHTS = ("ema", "raw")


def _restore_variables(
    checkpoint: pathlib.Path, abstract: dict[str, Any], context: str, weights: str | None
) -> tuple[Any, bool]:
    """({'params', ...model_state}, whether they are the EMA) of a zoo checkpoint: its EMA
    unless `weights` is "raw" or it has none; checked against the model's shapes."""
    target = {"params": abstract["params"]}
    model_state = {k: v for k, v in abstract.items() if k != "params"}
    if model_state:
        target["model_state"] = model_state
    stored = stored_arrays(checkpoint)
    if weights == "ema" and "ema" not in stored:
        raise ValueError(
            f"weights='ema' but {checkpoint} has no moving average of the weights (its run had "
            "optim.ema_decay=0): leave weights out, or train with optim.ema_decay > 0"
        )
    use_ema = "ema" in stored and weights != "raw"
    if use_ema:  # {"params": ..., "model_state": ...}, as the state's own
        stored = stored["ema"]
    stored_shapes = _flat_shapes({k: stored[k] for k in target if k in stored})
    problems = [
        f"{path}: {stored_shapes.get(path, 'missing')} in the checkpoint, {shape} in the model"
        for path, shape in _flat_shapes(target).items()
        if stored_shapes.get(path) != shape
    ]
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise ValueError(f"{checkpoint} does not fit {context}:\n  " + "\n  ".join(shown))
    if use_ema:
        restored = restore_on_this_host(checkpoint, items=("ema",))["ema"]
    else:
        restored = restore_on_this_host(checkpoint, items=tuple(target))
    return {"params": restored["params"], **restored.get("model_state", {})}, use_ema


def _load_workdir(
    workdir: pathlib.Path,
    model: str | None,
    class_names: Sequence[str] | None,
    threshold: float | None,
    batch_size: int,
    weights: str | None,
) -> Classifier:
    import ml_collections

    from zoo.data.datasets import dataset_from_config

    config_path = workdir / "config.json"
    checkpoint = latest_checkpoint(workdir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{workdir} has no checkpoint (checkpoints/<step>/state): give the --workdir of a "
            f"run that has trained (python train.py --workdir={workdir}), or a weights file"
        )
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing: train.py writes it into the workdir when a run starts; "
            "give the workdir of a zoo training run"
        )
    try:
        config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
        name, data_config = config.model.name, config.data
        dataset_name = data_config.name
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{config_path} is not a zoo run config ({e})") from None
    method = config.get("method", {}).get("name", "supervised")
    if method != "supervised":
        raise ValueError(
            f"{workdir} pretrained features with method '{method}' and has no classifier: "
            f"fine-tune it first (python train.py --config.init_from={workdir} "
            "--workdir=<new dir>), or evaluate its features with python -m zoo.evaluate "
            f"--workdir={workdir}"
        )
    if model is not None and model != name:
        raise ValueError(
            f"model='{model}' but {workdir} trained '{name}': leave model out with a workdir "
            "(it is read from config.json), or give a weights file with model="
        )
    try:
        spec = dataset_from_config(data_config)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(
            f"{workdir} trained on data.name='{dataset_name}', which cannot be opened here for "
            f"its classes and preprocessing: {e}"
        ) from None
    if class_names is None:
        try:
            class_names = spec.names(data_config)
        except Exception as e:  # noqa: BLE001 - dataset metadata unavailable (e.g. offline tfds)
            warnings.warn(
                f"class names of '{dataset_name}' unavailable ({type(e).__name__}: {e}); "
                "labelling classes by index (pass class_names= to name them)",
                stacklevel=3,
            )
    preprocessing = Preprocessing(
        ops=data_config.get("eval_ops", ""),
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        channels=spec.image_shape[-1] if spec.image_shape else 3,
        stored_size=tuple(spec.image_shape[:2]) if spec.image_shape else None,
    )
    try:
        input_shape = preprocessing.output_shape()
    except ValueError as e:
        raise ValueError(f"{workdir}: {e}") from None
    model_kwargs = config_overrides(config.model.to_dict())
    module = create_model(name, num_classes=spec.num_classes, **model_kwargs)
    abstract = jax.eval_shape(
        functools.partial(module.init, train=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, *input_shape), jnp.float32),
    )
    step = checkpoint.parent.name
    context = f"model '{name}' with {spec.num_classes} output(s) as {config_path} describes it"
    variables, use_ema = _restore_variables(checkpoint, dict(abstract), context, weights)
    return Classifier(
        module,
        variables,
        preprocessing,
        class_names,
        task=spec.task,
        threshold=config.method.get("threshold", 0.5) if threshold is None else threshold,
        batch_size=batch_size,
        description=f"{name} from {workdir} (step {step}, {spec.name}"
        + (", EMA weights)" if use_ema else ")"),
    )


def load_classifier(
    workdir_or_weights: str | os.PathLike,
    model: str | None = None,
    *,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 32,
    weights: str | None = None,
) -> Classifier:
    """A `Classifier` from a zoo training workdir or from pretrained weights.

    Args:
      workdir_or_weights: a zoo workdir (the `--workdir` of train.py: its `config.json` gives
        the model, classes, task, threshold and preprocessing; the latest
        `checkpoints/<step>/state` the variables), or a timm/torch weights file (`.pth`,
        `.safetensors`, `.npz`; see `zoo.load_pretrained`) converted by `model`'s `from_timm`.
      model: registry name; required with a weights file (its `PretrainedConfig` gives the
        preprocessing and class names); with a workdir only checked against the run's.
      class_names: overrides the class names (binary: (negative, positive)).
      threshold: overrides the binary/multilabel decision threshold (workdir:
        `method.threshold`; default 0.5).
      batch_size: images per forward pass.
      weights: which weights of a workdir: "ema", the exponential moving average of a run
        trained with `optim.ema_decay` (an error when it has none), "raw", the last trained
        weights, or None (default): the EMA when the checkpoint has one, else the raw ones.

    Returns:
      The classifier; `classifier.predict(paths)` gives ranked (label, probability) lists.

    Raises:
      FileNotFoundError: the path does not exist, or a workdir without checkpoint/config.
      ValueError: model missing or disagreeing, a checkpoint that does not fit its model, an
        unknown `weights`, or weights="ema" without an EMA.
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(
            f"weights must be 'ema' or 'raw' (or None: the EMA when there is one), got '{weights}'"
        )
    source = pathlib.Path(workdir_or_weights).expanduser()
    if source.is_dir():
        return _load_workdir(source, model, class_names, threshold, batch_size, weights)
    if not source.exists():
        raise FileNotFoundError(
            f"{source} does not exist: give a zoo workdir (the --workdir of train.py) or a "
            "weights file (.pth, .safetensors, .npz) with model=<registry name>"
        )
    if weights == "ema":
        raise ValueError(
            f"weights='ema' needs a zoo workdir trained with optim.ema_decay > 0; {source} is "
            "a weights file (one set of weights): leave weights out"
        )
    if model is None:
        raise ValueError(
            f"{source} is a weights file: say which model it holds with "
            "model=<registry name> (--model), e.g. model='tf_efficientnet_lite0'"
        )
    entry = model_entry(model)
    config = entry.pretrained or PretrainedConfig()
    module = create_model(model, num_classes=config.num_classes)
    variables = load_pretrained(module, source, model_name=model)
    if class_names is None and config.label_names:
        names = load_class_names(config.label_names)
        class_names = names if len(names) == config.num_classes else None
    return Classifier(
        module,
        variables,
        Preprocessing.from_pretrained(config),
        class_names,
        threshold=0.5 if threshold is None else threshold,
        batch_size=batch_size,
        description=f"{model} from {source}",
    )
