"""Training methods, one file each, registered in `METHODS` (zoo/methods/base.py).

from zoo.methods import METHODS
method = METHODS.get("simclr")(config, model, spec, steps_per_epoch=..., total_steps=...)
"""

from zoo.methods import byol, dino, simclr, supervised  # noqa: F401  (registers each method)
from zoo.methods.base import METHODS, Method, View  # noqa: F401
