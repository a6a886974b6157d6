"""`init_from`: the variables a run starts from when its workdir has no checkpoint of its own.

A zoo workdir (its latest checkpoint; a self-supervised run's backbone) or a timm/torchvision
weights file, merged into the freshly initialised state: a classifier head with another number
of classes is re-initialised, any other mismatch is an error naming the parameter.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from zoo.models import model_entry
from zoo.models.weights import load_pretrained, load_state_dict
from zoo.training.checkpoint import latest_checkpoint, restore_on_this_host
from zoo.training.state import TrainState


def load_init_from(config: Any, model, state: TrainState) -> tuple[Any, Any, list[str]]:
    """(params, model_state, re-initialised head paths) to start fine-tuning from.

    `config.init_from` is a zoo workdir (its latest checkpoint, any number of classes) or a
    weights file that `zoo.load_pretrained` reads (timm/torchvision .safetensors/.pth/.npz,
    converted by `config.init_from_model`'s converter, default `config.model.name`; a ViT's
    position embedding is resized to the model's `img_size`). When the classifier head (the
    model's registered `head` parameters) has another number of classes, it keeps its fresh
    initialisation (from a workdir) or starts at zeros (from a weights file, as
    `load_pretrained` does), and is listed as re-initialised; any other parameter that is
    missing or has another shape is an error naming it.
    """
    source = pathlib.Path(config.init_from).expanduser()
    head = model_entry(config.model.name).head
    zero_filled: list[str] = []  # head parameters a weights file's loader set to zeros
    if source.is_dir():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise FileNotFoundError(
                f"init_from={source} is a folder without checkpoints/<step>/; give a zoo "
                "workdir that has trained, or a weights file"
            )
        loaded = ssl_backbone(restore_on_this_host(checkpoint))
    elif source.is_file():
        model_name = config.init_from_model or config.model.name
        state_dict = load_state_dict(source)
        with warnings.catch_warnings():  # `run` names the re-initialised head instead
            warnings.simplefilter("ignore", UserWarning)
            loaded = load_pretrained(model, state_dict, model_name=model_name)
        # load_pretrained zero-fills a head whose number of classes differs (uniform
        # predictions at the start, as big_vision fine-tunes); report it as re-initialised.
        own = traverse_util.flatten_dict(model_entry(model_name).from_timm(state_dict, model))
        zero_filled = [
            "/".join(path)
            for path, value in traverse_util.flatten_dict(loaded).items()
            if path[0] == "params"
            and path[1] in head
            and getattr(own.get(path), "shape", None) != value.shape
        ]
    else:
        raise FileNotFoundError(f"init_from={source} is neither a zoo workdir nor a file")
    fresh = traverse_util.flatten_dict({"params": state.params, **state.model_state})
    loaded = traverse_util.flatten_dict(jax.device_get(loaded))
    merged, reinit, problems = {}, [], []
    for path, value in fresh.items():
        is_head = path[0] == "params" and path[1] in head
        if path in loaded and loaded[path].shape == value.shape:
            merged[path] = jnp.asarray(loaded[path], value.dtype)
        elif is_head:
            merged[path] = value
            reinit.append("/".join(path))
        else:
            got = loaded[path].shape if path in loaded else "missing"
            problems.append(f"{'/'.join(path)}: {got} in init_from, {value.shape} in the model")
    if problems:
        raise ValueError(
            f"init_from={source} does not fit model '{config.model.name}':\n  "
            + "\n  ".join(problems)
        )
    variables = traverse_util.unflatten_dict(merged)
    return variables.pop("params"), variables, reinit + zero_filled


def ssl_backbone(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """{"params", <collections>} of a restored train state: its EMA of the weights when the
    run kept one (`optim.ema_decay`; the weights its `ema_*` metrics and `load_classifier`
    report); for a self-supervised run's state (params {"backbone": ..., heads...}), its
    backbone's: the EMA teacher's where the method evaluates the teacher (DINO), else the
    trained network's."""
    params, model_state = checkpoint["params"], checkpoint["model_state"]
    if checkpoint.get("ema") is not None:
        params, model_state = checkpoint["ema"]["params"], checkpoint["ema"]["model_state"]
    if "backbone" not in params:
        return {"params": params, **model_state}
    extra = checkpoint.get("extra") or {}
    if "teacher" in extra:
        params, model_state = extra["teacher"], extra["teacher_state"]
    return {
        "params": params["backbone"],
        **{c: v["backbone"] for c, v in model_state.items() if "backbone" in v},
    }
