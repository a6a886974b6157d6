"""Values and gradients computed into one buffer, which XLA:CPU neither fuses into their
consumers nor recomputes inside them.

XLA:CPU fuses elementwise producers into every consumer, including the transposing copies
that feed a kernel gradient's matmul and the operands of YNNPACK calls (which need each
operand as a buffer), and then recomputes them there, often reading them column-wise. A
run-time conditional stops that (`one_buffer`); `lax.optimization_barrier` it removes before
fusion. Where each buffer pays: benchmarks/SPEED.md, "CPU policy fields".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.policy import current


def one_buffer(x: jax.Array) -> jax.Array:
    """`x` unchanged, computed into one buffer: routed through a `lax.cond` whose predicate is
    known only at run time. Both branches are the identity (the predicate is False only when
    the first element is NaN, and then `x + 0` passes it through unchanged)."""
    first = x.reshape(-1)[0]
    return lax.cond(first == first, lambda v: v, lambda v: v + 0, x)


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def transposed_buffer(x: jax.Array, in_branches: bool = True) -> jax.Array:
    """x with its last two axes swapped, as one buffer that XLA:CPU does not fold back into
    the matmul reading it (YNNPACK takes a contracted-rows operand only in the plain [K, N]
    layout). `in_branches`: transpose inside the conditional's branches, where the transpose
    is a bitcast and one copy after the conditional transposes, rather than before it, where
    XLA gave the producer a strided output layout (`CpuPolicy.transpose_in_branches`)."""
    if not in_branches:
        return one_buffer(_swap(x))
    first = x.reshape(-1)[0]
    return lax.cond(first == first, _swap, lambda v: _swap(v) + 0, x)


@jax.custom_vjp
def gradient_computed_once(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is one buffer (`one_buffer`)."""
    return x


gradient_computed_once.defvjp(lambda x: (x, None), lambda _, grad: (one_buffer(grad),))


@jax.custom_vjp
def value_computed_once(x: jax.Array) -> jax.Array:
    """x computed into one buffer (`one_buffer`), its gradient passed through unchanged."""
    return one_buffer(x)


value_computed_once.defvjp(lambda x: (one_buffer(x), None), lambda _, grad: (grad,))


def block_input(x: jax.Array) -> jax.Array:
    """Identity at a transformer block's input; on CPU its gradient (the residual stream's) is
    one buffer (`CpuPolicy.block_input_gradient_buffer`)."""
    policy = current()
    if policy is None or not policy.block_input_gradient_buffer:
        return x
    return gradient_computed_once(x)


def block_output(x: jax.Array) -> jax.Array:
    """Identity at a convolutional residual block's output; on CPU the output is one buffer
    (`CpuPolicy.block_output_buffer`)."""
    policy = current()
    if policy is None or not policy.block_output_buffer:
        return x
    return value_computed_once(x)


def window_buffers() -> bool:
    """Whether Swin's windows, their gradient and its patch-merging input are buffers
    (`CpuPolicy.window_buffers`, with `block_input_gradient_buffer` for the latter)."""
    policy = current()
    return policy is not None and policy.window_buffers


def windows_in(windows: jax.Array, *, train: bool) -> jax.Array:
    """Identity on the windows going into attention; one buffer while training on CPU."""
    return value_computed_once(windows) if train and window_buffers() else windows


def windows_out(windows: jax.Array, *, train: bool) -> jax.Array:
    """Identity on the windows out of attention; their gradient one buffer while training."""
    return gradient_computed_once(windows) if train and window_buffers() else windows


def merge_input(x: jax.Array) -> jax.Array:
    """Identity at Swin's patch merging; its gradient one buffer under `window_buffers`."""
    return block_input(x) if window_buffers() else x
