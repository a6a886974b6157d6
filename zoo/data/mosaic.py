"""Derived datasets built from the embedded Fashion-MNIST subset, for the binary and
multi-label tasks on real images that need no download.

  LabelMapSource  another source's examples with the label mapped (e.g. footwear vs not)
  MosaicSource    seeded 2x2 mosaics of another source's images, labelled multi-hot with the
                  set of classes present (a multi-label task with 1-4 positives per image)

Both are random-access and deterministic per index (the mosaic tiles are drawn once, from
`seed`, when the source is made), so grain can shuffle, shard and checkpoint them.

    footwear = LabelMapSource(embedded, lambda label: np.int32(label in (5, 7, 9)))
    mosaics = MosaicSource(embedded, num_classes=10, seed=0)   # 56x56 images, uint8 [10]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class LabelMapSource:
    """The examples of `source` with `label` replaced by `label_map(label)`."""

    def __init__(self, source: Any, label_map: Callable[[Any], Any]):
        self.source, self.label_map = source, label_map

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        return {**example, "label": self.label_map(example["label"])}

    def __repr__(self) -> str:
        return f"LabelMapSource({self.source!r})"


class MosaicSource:
    """2x2 mosaics of `source`'s images: [2H, 2W, C], label uint8 multi-hot [num_classes].

    Args:
      source: examples {"image": uint8 [H, W, C], "label": int class} (all images one size).
      num_classes: the number of classes of `source`.
      seed: draws the four tiles of every mosaic (the same seed, the same dataset).
      length: the number of mosaics (default: as many as `source` has images).
    """

    def __init__(self, source: Any, num_classes: int, seed: int, length: int | None = None):
        self.source, self.num_classes = source, num_classes
        length = len(source) if length is None else length
        self.tiles = np.random.default_rng(seed).integers(0, len(source), size=(length, 4))

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        examples = [self.source[int(i)] for i in self.tiles[index]]
        images = [e["image"] for e in examples]
        top, bottom = np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)
        label = np.zeros(self.num_classes, np.uint8)
        label[[int(e["label"]) for e in examples]] = 1
        return {"image": np.concatenate([top, bottom], axis=0), "label": label}

    def __repr__(self) -> str:
        return f"MosaicSource({self.source!r}, {len(self)} mosaics)"
