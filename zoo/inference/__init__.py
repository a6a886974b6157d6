"""Classify images with a zoo model: from a training workdir or from pretrained weights.

    import zoo
    classifier = zoo.load_classifier("runs/default")      # what `train.py --workdir` wrote
    classifier.predict(["shoe.jpg"], top_k=3)
    # [[('Sneaker', 0.91...), ('Sandal', ...), ('Ankle boot', ...)]]
    classifier = zoo.load_classifier("lite0.pth", model="tf_efficientnet_lite0")  # timm weights

classifier.py: `Classifier` and `Ensemble` (eval preprocessing, the jitted forward pass,
top-k labels and decisions); loading.py: `load_classifier`, which reads a workdir's config
and checkpoint or a weights file into a model, its variables and its metadata.
"""

from zoo.inference.classifier import (
    Classifier,
    Ensemble,
    ImageLike,
    Preprocessing,
    decide,
    eval_transform,
    load_image,
    rank,
)
from zoo.inference.loading import load_classifier

__all__ = [
    "Classifier",
    "Ensemble",
    "ImageLike",
    "Preprocessing",
    "decide",
    "eval_transform",
    "load_classifier",
    "load_image",
    "rank",
]
