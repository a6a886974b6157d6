"""Prints README's model table: parameters, forward GFLOPs at the model's input size, input size
and pretrained weights, for the given registry names (default: every registered model).

    python scripts/model_table.py resnet50 vit_small_patch16_224   # two rows
    python scripts/model_table.py                                  # all 61 (minutes: compiles each)

Parameters are counted at 1000 classes (10 for the 32 px variants, which have no weights) and
equal timm's (tests/test_models.py pins them); GFLOPs are XLA's count of one image's eval-mode
forward pass (zoo/models/cost.py: a multiply-add is 2).
"""

from __future__ import annotations

import sys

import zoo
from zoo.models import cost


def row(name: str) -> list[str]:
    pretrained = zoo.model_entry(name).pretrained  # None or no timm name: a 32 px model
    small = pretrained is None or not pretrained.timm_name
    model = zoo.create_model(name, num_classes=10 if small else pretrained.num_classes)
    shape = (32, 32, 3) if small else pretrained.input_size
    params = cost.parameter_count(model, shape)
    gflops = cost.forward_flops(model, shape) / 1e9
    weights = "none (train it)" if small else f"timm `{pretrained.timm_name}`"
    return [f"`{name}`", f"{params / 1e6:.2f} M", f"{gflops:.2f}", str(shape[0]), weights]


def main(names: list[str]) -> None:
    print("| model | params | GFLOPs | input px | pretrained weights |")
    print("|---|---:|---:|---:|---|")
    for name in names or zoo.list_models():
        print("| " + " | ".join(row(name)) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
