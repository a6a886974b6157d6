"""Human-readable class-name lists shipped with zoo, by name.

    from zoo.data.class_names import load_class_names
    names = load_class_names("imagenet")  # 1000 names; names[967] == "espresso"

`PretrainedConfig.label_names` names one of these lists. The ImageNet-1k list is the first
WordNet lemma of each class's synset, in the standard class-index order (timm's
`ImageNetInfo`, from which it was derived); a few names repeat ("crane" the bird and the
machine, "maillot" twice), as in every list of the usual short names.
"""

from __future__ import annotations

import functools
from importlib import resources

# name -> file in this package, one class name per line, line i = class index i.
CLASS_NAME_FILES = {"imagenet": "imagenet_class_names.txt"}


@functools.cache
def load_class_names(name: str) -> tuple[str, ...]:
    """The class names of the list called `name` ("imagenet"), indexed by class.

    Raises:
      ValueError: for an unknown list name, naming the known ones.
    """
    if name not in CLASS_NAME_FILES:
        raise ValueError(f"unknown class-name list '{name}'; known: {', '.join(CLASS_NAME_FILES)}")
    text = resources.files("zoo.data").joinpath(CLASS_NAME_FILES[name]).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)
