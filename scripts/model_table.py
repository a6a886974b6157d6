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


def model_and_shape(name: str):
    """The model as the table counts it, its input shape, and its timm weights' name ("" for
    zoo's 32 px models, which have none)."""
    pretrained = zoo.model_entry(name).pretrained  # None or no timm name: a 32 px model
    if pretrained is None or not pretrained.timm_name:
        return zoo.create_model(name, num_classes=10), (32, 32, 3), ""
    model = zoo.create_model(name, num_classes=pretrained.num_classes)
    return model, pretrained.input_size, pretrained.timm_name


def params_cell(name: str) -> str:
    model, shape, _ = model_and_shape(name)
    return f"{cost.parameter_count(model, shape) / 1e6:.2f} M"


def row(name: str) -> list[str]:
    model, shape, timm_name = model_and_shape(name)
    gflops = cost.forward_flops(model, shape) / 1e9
    weights = f"timm `{timm_name}`" if timm_name else "none (train it)"
    return [f"`{name}`", params_cell(name), f"{gflops:.2f}", str(shape[0]), weights]


def main(names: list[str]) -> None:
    print("| model | params | GFLOPs | input px | pretrained weights |")
    print("|---|---:|---:|---:|---|")
    for name in names or zoo.list_models():
        print("| " + " | ".join(row(name)) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
