"""The model registry: `@register_model` on a tiny function per variant, as in timm.

@register_model(pretrained=PretrainedConfig(timm_name="resnet50.a1_in1k", ...),
                from_timm=resnet_from_timm)
def resnet50(**kw) -> nn.Module:
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kw)

model = create_model("resnet50", num_classes=10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from zoo.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """What a set of weights expects at eval time (timm's `pretrained_cfg`).

    Eval preprocessing: resize the short side to `input_size / crop_pct` with
    `interpolation`, centre-crop `input_size`, scale to [0, 1], normalise by `mean`/`std`.
    """

    input_size: tuple[int, int, int] = (224, 224, 3)  # HWC
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    num_classes: int = 1000
    label_names: str = "imagenet"  # name of a class-name list, or "" when unknown
    license: str = ""
    timm_name: str = ""  # e.g. "resnet50.a1_in1k"; timm/HF hub id of the weights


# zoo's own small-image variants (`vit_nano_patch4_32`, ...): no timm counterpart and no
# weights, so this only says what they are built for: 32 x 32 inputs (CIFAR, or 28 px
# Fashion-MNIST padded to 32) and 10 classes, without a class-name list.
SMALL_IMAGE_32 = PretrainedConfig(
    input_size=(32, 32, 3), crop_pct=1.0, num_classes=10, label_names="", timm_name=""
)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    pretrained: PretrainedConfig | None = None
    # `from_timm(state_dict, model) -> variables`: a timm/torchvision state_dict (name -> numpy
    # array) to flax variables ({'params': ..., 'batch_stats': ...}) for `model`.
    from_timm: Callable[..., dict[str, Any]] | None = None
    # Top-level params collection key(s) of the classifier head, re-initialised by
    # `load_pretrained` when `num_classes` differs from the weights'.
    head: tuple[str, ...] = ("head",)


MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    pretrained: PretrainedConfig | None = None,
    from_timm: Callable[..., dict[str, Any]] | None = None,
    head: tuple[str, ...] = ("head",),
):
    """Decorator registering a model factory under its function name."""

    def add(fn):
        MODELS.register(
            fn,
            metadata=ModelEntry(factory=fn, pretrained=pretrained, from_timm=from_timm, head=head),
        )
        return fn

    return add if fn is None else add(fn)


def register_variant(
    name: str,
    module: type[nn.Module],
    defaults: dict[str, Any],
    *,
    pretrained: PretrainedConfig | None,
    from_timm: Callable[..., dict[str, Any]] | None,
    head: tuple[str, ...] = ("head",),
) -> Callable[..., nn.Module]:
    """Registers `name` as `module(**defaults)`: a factory whose keyword arguments override
    the defaults (`create_model(name, num_classes=10)`), documented by its defaults.

    Each family registers its variants with it, e.g.
    `register_variant("resnet50", ResNet, dict(stage_sizes=(3, 4, 6, 3)), pretrained=...,
    from_timm=resnet_from_timm, head=("fc",))`.
    """

    def factory(**kw) -> nn.Module:
        return module(**{**defaults, **kw})

    factory.__name__ = name
    factory.__doc__ = (
        f"{name}: {module.__name__}({', '.join(f'{k}={v}' for k, v in defaults.items())})"
    )
    return register_model(factory, pretrained=pretrained, from_timm=from_timm, head=head)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model, e.g. `create_model("resnet50", num_classes=10)`.

    Args:
      name: registry name (timm's name where timm has the model).
      **overrides: module fields (`num_classes`, `dtype`, `drop_path_rate`, ...).

    Returns:
      The `flax.linen.Module`. Raises ValueError naming close matches for an unknown name,
      and naming the field for an unknown override.
    """
    factory = MODELS.get(name)
    try:
        return factory(**overrides)
    except TypeError as e:
        raise ValueError(f"model '{name}' does not accept these arguments: {e}") from None


# Fields a run config's `model` namespace may set, and the value that means "the registered
# variant's own" (configs/common.py): only set ones reach the model.
OPTIONAL_FIELDS = {"stem": "", "patch_size": 0, "img_size": 0}


def config_overrides(model_config: dict[str, Any]) -> dict[str, Any]:
    """A config's `model` namespace (as a dict) -> `create_model` overrides: without `name`
    and `dtype`, and without the OPTIONAL_FIELDS left at their "variant's own" value."""
    return {
        key: value
        for key, value in model_config.items()
        if key not in ("name", "dtype") and value != OPTIONAL_FIELDS.get(key, object())
    }


def check_input_size(model: nn.Module, height: int, width: int) -> None:
    """ValueError when `model` cannot take height x width inputs, from its family's optional
    `check_input(height, width)` method (a ViT's or Swin's patch size must divide them, a
    ConvNeXt needs at least 32 px): a cheap check before anything is traced or compiled."""
    check = getattr(type(model), "check_input", None)
    if check is not None:
        check(model, height, width)


def list_models(pattern: str = "*") -> list[str]:
    """Names of registered models matching a glob pattern, sorted."""
    return MODELS.list(pattern)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of a model: factory, pretrained metadata, timm converter."""
    return MODELS.metadata(name)
