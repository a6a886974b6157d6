"""Softmax attention, with a hand-written gradient and batch slices on CPU.

XLA:CPU computed the value and key gradients of JAX's own derivative (P^T dO, dS^T Q) as
batched matmuls with a transposed left operand, which YNNPACK refuses and Eigen runs slowly
at window shapes; the hand-written gradient writes those operands out transposed
(`CpuPolicy.attention_vjp`) and returns the stacked qkv's gradient as one stack. YNNPACK runs a
batched matmul's batch elements one after another on one core, and XLA runs independent
operations side by side only once more than 8 are ready, so attention is computed for slices
of the batch apart (`attention_slices`, `attention_gradient_slices`). Measurements:
benchmarks/SPEED.md, "CPU policy fields".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.cpu.buffers import transposed_buffer
from zoo.cpu.policy import CpuPolicy, current


def attention_weights(q: jax.Array, k: jax.Array, biases=()) -> jax.Array:
    """softmax(q k^T + sum(biases)) over the last axis, in float32: q, k [B, heads, N, d]."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    for bias in biases:
        logits = logits + bias
    return jax.nn.softmax(logits, axis=-1)


def _attention(q, k, v, biases):
    weights = attention_weights(q, k, biases)
    return jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v), weights


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The cotangent of a broadcast to x.shape from `shape`: x summed over broadcast axes."""
    x = x.sum(tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axes, keepdims=True)


def _attention_backward(residuals, grad, in_branches: bool):
    q, k, v, weights, biases = residuals
    weights_t = transposed_buffer(weights, in_branches).astype(v.dtype)
    grad_v = jnp.einsum("bhkq,bhqd->bhkd", weights_t, grad)
    grad_weights = jnp.einsum("bhqd,bhkd->bhqk", grad, v).astype(jnp.float32)
    grad_logits = weights * (grad_weights - jnp.sum(grad_weights * weights, -1, keepdims=True))
    grad_q = jnp.einsum("bhqk,bhkd->bhqd", grad_logits.astype(k.dtype), k)
    grad_logits_t = transposed_buffer(grad_logits, in_branches).astype(q.dtype)
    grad_k = jnp.einsum("bhkq,bhqd->bhkd", grad_logits_t, q)
    grad_biases = tuple(_sum_to_shape(grad_logits, b.shape).astype(b.dtype) for b in biases)
    return grad_q, grad_k, grad_v, grad_biases


def _slices(q: jax.Array, most: int, min_flops: int) -> list[slice]:
    """Up to `most` equal slices of the batch, each with at least `min_flops` in its q k^T;
    one slice, the whole batch, for small work."""
    batch, heads, tokens, head_dim = q.shape
    flops = 2 * batch * heads * tokens * tokens * head_dim
    most = max(1, min(most, batch, flops // min_flops))
    size = batch // max(n for n in range(1, most + 1) if batch % n == 0)
    return [slice(start, start + size) for start in range(0, batch, size)]


def _has_batch_axis(bias: jax.Array, batch: int) -> bool:
    return bias.ndim == 4 and bias.shape[0] == batch


def _sliced(biases, part: slice, batch: int) -> tuple:
    """The biases for one slice of the batch: a bias with a batch axis is sliced too."""
    return tuple(b[part] if _has_batch_axis(b, batch) else b for b in biases)


def _attention_in_slices(q, k, v, biases, policy: CpuPolicy):
    parts = _slices(q, policy.attention_slices, policy.min_slice_flops)
    if len(parts) == 1:
        return _attention(q, k, v, biases)[0]
    batch = q.shape[0]
    return jnp.concatenate(
        [_attention(q[p], k[p], v[p], _sliced(biases, p, batch))[0] for p in parts]
    )


def _attention_backward_in_slices(residuals, grad, policy: CpuPolicy):
    q, k, v, weights, biases = residuals
    tokens = q.shape[2]
    most = policy.attention_gradient_slices
    most = most if tokens >= policy.min_tokens_for_gradient_slices else 1
    parts = _slices(q, most, policy.min_slice_flops)
    in_branches = policy.transpose_in_branches
    if len(parts) == 1:
        return _attention_backward(residuals, grad, in_branches)
    batch = q.shape[0]
    grads = [
        _attention_backward(
            (q[p], k[p], v[p], weights[p], _sliced(biases, p, batch)), grad[p], in_branches
        )
        for p in parts
    ]
    grad_q, grad_k, grad_v = (jnp.concatenate([g[i] for g in grads]) for i in range(3))
    grad_biases = []
    for i, b in enumerate(biases):  # a bias with a batch axis was sliced; others were shared
        pieces = [g[3][i] for g in grads]
        grad_biases.append(jnp.concatenate(pieces) if _has_batch_axis(b, batch) else sum(pieces))
    return grad_q, grad_k, grad_v, tuple(grad_biases)


def _qkv_attention(qkv, scale, biases, policy):
    return _attention_in_slices(qkv[0] * scale, qkv[1], qkv[2], biases, policy)


def _qkv_attention_forward(qkv, scale, biases, policy):
    q = qkv[0] * scale
    out, weights = _attention(q, qkv[1], qkv[2], biases)
    return out, (q, qkv[1], qkv[2], weights, biases)


def _qkv_attention_backward(scale, policy, residuals, grad):
    """The gradient of the stacked qkv as one stack of the three (with q's scale), rather than
    JAX's three zero-padded copies of qkv's shape summed."""
    grad_q, grad_k, grad_v, grad_biases = _attention_backward_in_slices(residuals, grad, policy)
    return jnp.stack([grad_q * scale, grad_k, grad_v]), grad_biases


# scale and the policy are static: nondiff_argnums.
_attention_with_vjp = jax.custom_vjp(_qkv_attention, nondiff_argnums=(1, 3))
_attention_with_vjp.defvjp(_qkv_attention_forward, _qkv_attention_backward)


def qkv_attention(qkv: jax.Array, scale: float, biases=(), policy: CpuPolicy | None = None):
    """softmax(scale q k^T + sum(biases)) v for q, k, v = qkv [3, B, heads, N, head_dim] (the
    qkv projection's output); each bias broadcastable to [B, heads, N, N], float32 (the
    softmax is float32). `policy`: default the trace's (`zoo.cpu.current()`)."""
    policy = policy or current()
    if policy is not None and policy.attention_vjp:
        return _attention_with_vjp(qkv, scale, tuple(biases), policy)
    return _attention(qkv[0] * scale, qkv[1], qkv[2], biases)[0]
