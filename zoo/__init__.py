"""zoo: a JAX/Flax image-classification model zoo and research codebase.

import zoo
zoo.list_models("resnet*")
model = zoo.create_model("resnet50", num_classes=10)
classifier = zoo.load_classifier("runs/default")  # a training workdir, or weights + model=

`import zoo` appends zoo's XLA:CPU flags to XLA_FLAGS (zoo/cpu/flags.py) and does nothing else
to the process: the names below are imported on first use (PEP 562), so JAX, Flax, orbax and
Pillow load only when something needs them, and glibc's allocator is left to the entry points
(zoo/cpu/allocator.py).
"""

from zoo.cpu import flags as _flags

_flags.apply_cpu_flags()  # before anything starts JAX's CPU backend (zoo/cpu/flags.py)

import importlib as _importlib  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "Classifier": "zoo.inference",
    "Ensemble": "zoo.inference",
    "load_classifier": "zoo.inference",
    "create_model": "zoo.models",
    "list_models": "zoo.models",
    "model_entry": "zoo.models",
    "register_model": "zoo.models",
    "load_pretrained": "zoo.models.weights",
    "load_state_dict": "zoo.models.weights",
}
__all__ = [  # = _PUBLIC's names, spelt out for linters and type checkers
    "Classifier",
    "Ensemble",
    "create_model",
    "list_models",
    "load_classifier",
    "load_pretrained",
    "load_state_dict",
    "model_entry",
    "register_model",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from zoo.inference import Classifier, Ensemble, load_classifier
    from zoo.models import create_model, list_models, model_entry, register_model
    from zoo.models.weights import load_pretrained, load_state_dict


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'zoo' has no attribute '{name}'")
    value = getattr(_importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list[str]:  # the public names and the submodules imported so far
    public = {name for name in globals() if not name.startswith("_")} - {"TYPE_CHECKING"}
    return sorted(public | set(__all__) | {"__version__"})
