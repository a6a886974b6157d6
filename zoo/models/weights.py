"""Load timm/torchvision weights into zoo models, checking every name and shape.

    import zoo
    variables = zoo.load_pretrained("vit_small_patch16_224", "model.safetensors")
    model = zoo.create_model("vit_small_patch16_224")
    logits = model.apply(variables, images, train=False)

    # Fine-tuning on 10 classes: the classifier head is re-initialised (with a warning).
    model = zoo.create_model("resnet50", num_classes=10)
    variables = zoo.load_pretrained(model, "resnet50.pth", model_name="resnet50")

Weights come as a `.safetensors` file, a `.pth`/`.pt`/`.bin` file (read with
`torch.load(weights_only=True)`, never an unrestricted pickle; `{'state_dict': ...}`,
`{'model': ...}` wrappers and DataParallel's `module.` prefix are unwrapped), a `.npz`, or a
dict of arrays. Each family's converter (`from_timm`, registered with the model) renames the
timm state_dict into flax variables; this module then compares the result against
`jax.eval_shape(model.init)` and fails with the names of missing or unexpected parameters and
of any parameter whose shape differs, except the classifier head (`head=` of
`register_model`) when the number of classes differs: that one is re-initialised to zeros.

torch and safetensors are the optional `[convert]` extra and are only imported inside the
functions that read those files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.models.registry import MODELS, ModelEntry, create_model, model_entry

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]


# --------------------------------------------------------------------------- reading files


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.dtype.is_floating_point:
            value = value.float()  # numpy has no bfloat16
        return value.numpy()
    return np.asarray(value)


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """Finds the state_dict inside common checkpoint wrappers."""
    while isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module", "state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            return obj
    raise ValueError(f"expected a state_dict (a mapping of names to tensors), got {type(obj)}")


TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
SUPPORTED_FORMATS = (
    ".safetensors, .pth/.pt/.bin/.ckpt (torch.load with weights_only=True) or .npz (numeric "
    "arrays only)"
)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _read_torch(path: str) -> Any:
    import pickle

    import torch  # lazy: the [convert] extra

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise here
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(
                f"{path} is not a readable torch weights file ({_first_line(e)})"
            ) from None
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        what = f"`{found.group(1)}`" if found else "a Python object that is not a tensor"
        raise ValueError(
            f"{path} is not a plain weights file: unpickling it would call or build {what}, "
            "which torch.load(weights_only=True) refuses (zoo never unpickles arbitrary "
            "objects). Save the state_dict alone (torch.save(model.state_dict(), f)) or as "
            ".safetensors, where you trust the file"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt file: torch raises many kinds
        raise ValueError(
            f"{path} is not a readable torch weights file (corrupt, truncated or another "
            f"format: {_first_line(e)})"
        ) from None


def _read_safetensors(path: str) -> Any:
    from safetensors.torch import load_file  # lazy: the [convert] extra

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, or torch's errors on its dtypes
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt, truncated or another format: "
            f"{_first_line(e)})"
        ) from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    def unreadable(error: BaseException) -> ValueError:
        return ValueError(
            f"{path} is not a readable .npz file (corrupt, truncated or another format: "
            f"{_first_line(error)})"
        )

    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" not in str(e):
            raise unreadable(e) from None
        raise ValueError(
            f"{path} is not a plain weights file: it is not an .npz (zip) or .npy file, and "
            "numpy would read it as a Python pickle, which zoo never unpickles "
            "(np.load(allow_pickle=False)); save numeric arrays with np.savez"
        ) from None
    except Exception as e:  # noqa: BLE001 - EOFError, OSError, ... of a corrupt file
        raise unreadable(e) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single .npy array, not named arrays (np.savez)")
    arrays = {}
    with data:
        for name in data.files:
            try:
                arrays[name] = data[name]
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise unreadable(e) from None
                raise ValueError(
                    f"{path} is not a plain weights file: array '{name}' holds Python objects "
                    "(dtype object), which zoo never unpickles (np.load(allow_pickle=False)); "
                    "save numeric arrays only"
                ) from None
            except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, ...
                raise unreadable(e) from None
    return arrays


def load_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """Reads weights into a flat `{name: numpy array}` (floats as float32).

    Args:
      path_or_state_dict: a `.safetensors`, `.pth`/`.pt`/`.bin`/`.ckpt` (torch,
        `weights_only=True`) or `.npz` (`allow_pickle=False`) file, or a mapping of names to
        arrays/tensors. Never an unrestricted pickle.

    Returns:
      The state_dict, wrappers (`state_dict`, `model`, ...) and a `module.` prefix removed.

    Raises:
      FileNotFoundError: no file at the path.
      ValueError: naming the file when it is of another format, corrupt, or not plain weights
        (pickled Python objects, which are refused, never run).
    """
    path = None
    if isinstance(path_or_state_dict, Mapping):
        raw = path_or_state_dict
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no weights file at '{path}'")
        if os.path.isdir(path):
            raise ValueError(
                f"{path} is a directory, not a weights file ({SUPPORTED_FORMATS}); flax "
                "variables written by `python -m zoo.convert` are read by "
                "zoo.convert.read_converted"
            )
        if path.endswith(".safetensors"):
            raw = _read_safetensors(path)
        elif path.endswith(TORCH_EXTENSIONS):
            raw = _read_torch(path)
        elif path.endswith(".npz"):
            raw = _read_npz(path)
        else:
            raise ValueError(
                f"unknown weights format '{path}': zoo reads {SUPPORTED_FORMATS}, never an "
                "unrestricted pickle (.pkl)"
            )
    try:
        state = _unwrap(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None
    names = [k for k in state if not isinstance(k, str)]
    if names:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}parameter names must be strings, got {names[:3]}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if not hasattr(value, "shape"):
            continue  # e.g. a stray epoch counter
        array = _to_numpy(value)
        out[key] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
    return out


# --------------------------------------------------------------------------- generic renaming


def torch_to_flax(state_dict: StateDict, rename=None) -> dict[str, Any]:
    """The generic part of every converter: torch names and layouts -> nested flax variables.

    `blocks.0.attn.qkv.weight` -> params/blocks_0/attn/qkv/kernel (an index joins its parent
    with "_", as flax names list elements). Linear weights [out, in] -> kernel [in, out]; conv
    OIHW -> HWIO; 1-d weights (norms) -> scale; BatchNorm running_mean/var -> batch_stats.

    Args:
      state_dict: flat torch names to numpy arrays.
      rename: optional `fn(key, value) -> (key, value) | None`, applied first; returning
        None drops the entry, returning a key whose last part is not a torch leaf name
        ("weight", "bias", ...) stores the value at that exact path unchanged.

    Returns:
      {'params': ..., 'batch_stats': ...} (batch_stats only when present), nested dicts.
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        if rename is not None:
            renamed = rename(key, value)
            if renamed is None:
                continue
            key, value = renamed
        *module, leaf = key.split(".")
        path: list[str] = []
        for part in module:
            if part.isdigit() and path:
                path[-1] = f"{path[-1]}_{part}"
            else:
                path.append(part)
        value = np.asarray(value)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "running_mean":
            flat[("batch_stats", *path, "mean")] = value
        elif leaf == "running_var":
            flat[("batch_stats", *path, "var")] = value
        elif leaf == "weight" and value.ndim == 4:
            flat[("params", *path, "kernel")] = value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            flat[("params", *path, "kernel")] = value.T
        elif leaf == "weight":
            flat[("params", *path, "scale")] = value
        elif leaf == "bias":
            flat[("params", *path, "bias")] = value
        else:  # a bare parameter (cls_token, pos_embed, ...), kept as is
            flat[("params", *path, leaf)] = value
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------- loading


def _find_entry(model: nn.Module, model_name: str | None) -> tuple[str, ModelEntry]:
    if model_name is not None:
        return model_name, model_entry(model_name)
    # Without a name, the registered variants of the same module class share the converter;
    # their head keys are merged (e.g. DeiT's `head_dist` besides ViT's `head`).
    matches = [
        (name, model_entry(name))
        for name in MODELS
        if model_entry(name).from_timm is not None
        and type(model_entry(name).factory()) is type(model)
    ]
    if not matches:
        raise ValueError(f"no registered model builds a {type(model).__name__}; pass model_name=")
    name, entry = matches[0]
    heads = tuple(dict.fromkeys(h for _, e in matches for h in e.head))
    return name, dataclasses.replace(entry, head=heads)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def load_pretrained(
    model_name_or_module: str | nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
) -> dict[str, Any]:
    """timm/torchvision weights -> flax variables for a zoo model, checked name by name.

    Args:
      model_name_or_module: a registry name (the model is built with `create_model(name,
        num_classes=num_classes)`), or a built module (its own `num_classes` is used, or
        `num_classes` if given).
      path_or_state_dict: a `.safetensors`, `.pth`/`.pt`/`.bin` or `.npz` file, or a dict of
        arrays (see `load_state_dict`).
      model_name: registry name whose converter to use, when a module is given; found from the
        module's class when omitted.
      num_classes: classes of the model's head. When it differs from the weights', the head
        parameters are re-initialised to zeros and a warning says so.
      input_size: side of the dummy input used to infer shapes; default: the model's
        pretrained input size, else 224.

    Returns:
      Variables `{'params': ..., ['batch_stats': ...]}` as jax arrays in the model's
      `param_dtype`, ready for `model.apply(variables, x, train=False)`.

    Raises:
      ValueError: naming missing and unexpected parameters, or a parameter whose shape
        differs from the model's (other than the classifier head).
    """
    if isinstance(model_name_or_module, str):
        model_name = model_name_or_module
        kw = {} if num_classes is None else {"num_classes": num_classes}
        model = create_model(model_name, **kw)
    else:
        model = model_name_or_module
        if num_classes is not None and num_classes != getattr(model, "num_classes", None):
            model = model.clone(num_classes=num_classes)
    model_name, entry = _find_entry(model, model_name)
    if entry.from_timm is None:
        raise ValueError(f"model '{model_name}' has no timm converter (from_timm)")

    state_dict = load_state_dict(path_or_state_dict)
    source = "" if isinstance(path_or_state_dict, Mapping) else f" in {path_or_state_dict}"
    try:
        converted = traverse_util.flatten_dict(entry.from_timm(state_dict, model))
    except (ValueError, KeyError) as e:  # the converter found names it does not know
        raise ValueError(f"weights{source} do not fit '{model_name}': {e}") from None

    if input_size is None:
        input_size = entry.pretrained.input_size[0] if entry.pretrained else 224
    dummy = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    rng = jax.random.PRNGKey(0)

    def init():
        return model.init({"params": rng, "dropout": rng}, dummy, train=False)

    expected = traverse_util.flatten_dict(jax.eval_shape(init))  # shapes only, no compute

    def is_head(path: tuple[str, ...]) -> bool:
        return path[0] == "params" and len(path) > 1 and path[1] in entry.head

    missing = [p for p in expected if p not in converted]
    unexpected = [p for p in converted if p not in expected]
    mismatched = [p for p in expected if p in converted and converted[p].shape != expected[p].shape]
    reinit = [p for p in missing + mismatched if is_head(p)]
    dropped_head = [p for p in unexpected if is_head(p)]  # weights' head, model has none
    missing = [p for p in missing if p not in reinit]
    mismatched = [p for p in mismatched if p not in reinit]
    unexpected = [p for p in unexpected if p not in dropped_head]

    problems = []
    if missing:
        problems.append("missing: " + ", ".join(map(_dotted, missing)))
    if unexpected:
        problems.append("unexpected: " + ", ".join(map(_dotted, unexpected)))
    for p in mismatched:
        problems.append(
            f"shape mismatch for {_dotted(p)}: weights {tuple(converted[p].shape)}, "
            f"model {tuple(expected[p].shape)}"
        )
    if problems:
        raise ValueError(
            f"weights{source} do not fit '{model_name}' "
            f"(num_classes={getattr(model, 'num_classes', '?')}):\n  " + "\n  ".join(problems)
        )

    out = {
        p: jnp.asarray(converted[p], dtype=expected[p].dtype) for p in expected if p in converted
    }
    if reinit:
        message = (
            f"re-initialised classifier head of '{model_name}' to zeros "
            f"({', '.join(map(_dotted, reinit))}): the weights' head has another number of "
            f"classes than the model's {getattr(model, 'num_classes', '?')}"
        )
        log.warning(message)
        warnings.warn(message, stacklevel=2)
        # Zeros, as big_vision initialises a fine-tuning head: the model starts from uniform
        # predictions, and no forward pass (model.init) is needed to build the new head.
        out.update({p: jnp.zeros(expected[p].shape, expected[p].dtype) for p in reinit})
    if dropped_head:
        log.info("dropped the weights' head (%s): model has num_classes=0", len(dropped_head))
    return traverse_util.unflatten_dict({p: out[p] for p in expected})
