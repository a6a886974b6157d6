"""Model families; importing a family's module registers its variants."""

from zoo.models import (
    convnext,  # noqa: F401
    efficientnet,  # noqa: F401
    resnet,  # noqa: F401
    swin,  # noqa: F401
    vit,  # noqa: F401
)
from zoo.models.registry import (  # noqa: F401
    MODELS,
    PretrainedConfig,
    check_input_size,
    create_model,
    list_models,
    model_entry,
    register_model,
    register_variant,
)
