"""Shared by the timm parity tests: logits of a timm model against its zoo conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import zoo


def logit_diff(
    name: str, reference: torch.nn.Module, size: int, min_scale: float = 0.1, **zoo_kw
) -> float:
    """Max abs difference of logits between `reference` and the converted zoo model.

    `min_scale`: the reference logits must reach this magnitude, so that the comparison is
    not between near-zero numbers.
    """
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x).numpy()
    model = zoo.create_model(name, **zoo_kw)
    variables = zoo.load_pretrained(model, reference.state_dict(), model_name=name)
    apply = jax.jit(model.apply, static_argnames="train")  # one compile beats per-op eager
    logits = apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), train=False)
    assert logits.shape == expected.shape
    assert np.abs(expected).max() > min_scale, "degenerate reference logits"
    return float(np.abs(np.asarray(logits) - expected).max())
