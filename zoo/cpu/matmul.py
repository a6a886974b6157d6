"""Matmuls with a kernel gradient YNNPACK takes: dense layers, 1x1 and patch convolutions.

The kernel gradient of x [rows, I] @ kernel [I, O] is x^T @ grad, both operands contracted on
their leading (rows) dimension; XLA:CPU hands such a dot to Eigen, slow at it, rather than
YNNPACK. So the narrower operand is written out transposed into a buffer first and YNNPACK
takes the plain product (`CpuPolicy.matmul_kernel_gradient`; SPEED.md, "CPU policy fields").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.buffers import gradient_computed_once, one_buffer, transposed_buffer
from zoo.cpu.policy import CpuPolicy, current


def last_axis_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., I] @ kernel [I, O]."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul(x, kernel, policy):
    return last_axis_matmul(x, kernel)


def _matmul_forward(x, kernel, policy):
    return last_axis_matmul(x, kernel), (x, kernel)


def _matmul_backward(policy, residuals, grad):
    """grad_x as JAX's; grad_kernel [I, O] = x^T @ grad with the narrower of x [rows, I] and
    grad [rows, O] transposed into a buffer first. For a narrowing layer that is grad, so the
    product is grad^T @ x [O, I], a buffer transposed at the end."""
    x, kernel = residuals
    in_branches = policy.transpose_in_branches
    grad_x = lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    if kernel.shape[1] < kernel.shape[0]:
        grad_kernel = one_buffer(transposed_buffer(grad, in_branches) @ x).T
    else:
        grad_kernel = transposed_buffer(x, in_branches) @ grad
    return grad_x, grad_kernel.astype(kernel.dtype)


# The policy is static (hashable): nondiff_argnums.
matmul_with_vjp = jax.custom_vjp(_matmul, nondiff_argnums=(2,))
matmul_with_vjp.defvjp(_matmul_forward, _matmul_backward)


def matmul(x: jax.Array, kernel: jax.Array, policy: CpuPolicy | None = None) -> jax.Array:
    """x [..., I] @ kernel [I, O]; on CPU with `matmul_with_vjp`'s kernel gradient."""
    policy = policy or current()
    if policy is not None and policy.matmul_kernel_gradient:
        return matmul_with_vjp(x, kernel, policy)
    return last_axis_matmul(x, kernel)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: Dense's own contraction (the last
    axis of the input with the kernel's first) goes through `matmul`."""
    dense = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if dense and precision is None and preferred_element_type is None:
        return matmul(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides, policy: CpuPolicy) -> jax.Array:
    """1x1 convolution without padding: subsample, then [B, H, W, I] @ [I, O]. Its output's
    gradient is one buffer (`CpuPolicy.pointwise_gradient_buffer`): XLA had fused the work
    producing it (BatchNorm's backward, residual adds) into the transposing copy of the
    kernel gradient and read every operand column-wise there."""
    x = x[:, :: strides[0], :: strides[1], :]
    y = matmul(x, kernel[0, 0], policy)
    return gradient_computed_once(y) if policy.pointwise_gradient_buffer else y


def patchify_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """stride = kernel, no padding: non-overlapping patches [B, h, w, kh*kw*I] @ [kh*kw*I, O]."""
    kh, kw, cin, cout = kernel.shape
    b, height, width, _ = x.shape
    h, w = height // kh, width // kw
    x = x[:, : h * kh, : w * kw].reshape(b, h, kh, w, kw, cin).transpose(0, 1, 3, 2, 4, 5)
    return jnp.einsum("bhwk,ko->bhwo", x.reshape(b, h, w, -1), kernel.reshape(-1, cout))
