"""zoo: a JAX/Flax image-classification model zoo and research codebase.

import zoo
zoo.list_models("resnet*")
model = zoo.create_model("resnet50", num_classes=10)
classifier = zoo.load_classifier("runs/default")  # a training workdir, or weights + model=
"""

from zoo import backend as _backend

_backend.apply_cpu_flags()  # before anything starts JAX's CPU backend (zoo/backend.py)

from zoo.inference import Classifier, Ensemble, load_classifier  # noqa: E402, F401
from zoo.models import create_model, list_models, model_entry, register_model  # noqa: E402, F401
from zoo.models.pretrained import load_pretrained, load_state_dict  # noqa: E402, F401

__version__ = "0.1.0"
