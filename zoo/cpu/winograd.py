"""Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks"): a 3x3 convolution at stride 1 with padding 1, computed per 2x2
output tile from the 4x4 input tile around it. The input tiles (B^T d B) and the kernel
(G g G^T) are transformed with adds, subtracts and halvings, multiplied as 16 matmuls
[tiles, I] @ [I, O], and transformed back (A^T m A): 16 instead of 36 multiplies per tile and
channel pair. Results differ from the direct sum by float32 round-off (relative 1e-6,
tests/test_cpu.py).

`zoo.cpu.conv.conv2d` routes 3x3 convolutions at stride 1 with enough channels here
(`CpuPolicy.winograd`; it trains resnet18-CIFAR and resnet50 1.1-1.2x faster and compiles
them 2-4x slower, benchmarks/SPEED.md, "CPU policy fields"). Usable directly:

    y = winograd_conv3x3(x, kernel)  # x [B, H, W, I], kernel [3, 3, I, O] (HWIO), float32
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.buffers import one_buffer, transposed_buffer


def _tile_input(d):
    """B^T applied along a list of 4 rows (or columns) of a 4x4 tile."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _tile_output(m):
    """A^T applied along 4 transformed rows: 2 output rows."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _tile_output_transposed(y):
    """A applied along 2 rows: the transpose of `_tile_output`."""
    return [y[0], y[0] + y[1], y[0] - y[1], -y[1]]


def _tile_kernel(g):
    """G applied along 3 kernel rows: 4 transformed rows."""
    return [g[0], (g[0] + g[1] + g[2]) * 0.5, (g[0] - g[1] + g[2]) * 0.5, g[2]]


def _tile_kernel_transposed(u):
    """G^T applied along 4 transformed rows: 3 kernel rows."""
    return [u[0] + (u[1] + u[2]) * 0.5, (u[1] - u[2]) * 0.5, (u[1] + u[2]) * 0.5 + u[3]]


def _tiles(size: int) -> int:
    return -(-size // 2)


def winograd_kernels(kernel: jax.Array) -> list[jax.Array]:
    """G g G^T: kernel [3, 3, I, O] -> 16 matrices [I, O], row-major over (i, j)."""
    columns = [_tile_kernel([kernel[a, b] for a in range(3)]) for b in range(3)]
    return [u for i in range(4) for u in _tile_kernel([columns[b][i] for b in range(3)])]


def winograd_kernels_transposed(u: list[jax.Array]) -> jax.Array:
    """The transpose of `winograd_kernels`: 16 matrices [I, O] -> kernel [3, 3, I, O]."""
    columns = [_tile_kernel_transposed([u[4 * i + j] for i in range(4)]) for j in range(4)]
    return jnp.stack(
        [jnp.stack(_tile_kernel_transposed([columns[j][a] for j in range(4)])) for a in range(3)]
    )


def winograd_inputs(x: jax.Array) -> list[jax.Array]:
    """x [B, H, W, C] padded by 1 (and to even H, W) -> B^T d B of every 4x4 input tile at
    stride 2: 16 planes [B, ceil(H/2), ceil(W/2), C], row-major over the tile's (i, j)."""
    b, height, width, c = x.shape
    th, tw = _tiles(height), _tiles(width)
    x = jnp.pad(x, ((0, 0), (1, 1 + 2 * th - height), (1, 1 + 2 * tw - width), (0, 0)))
    pairs = x.reshape(b, th + 1, 2, tw + 1, 2, c)  # rows and columns in pairs
    d = [
        [pairs[:, i // 2 : i // 2 + th, i % 2, j // 2 : j // 2 + tw, j % 2] for j in range(4)]
        for i in range(4)
    ]
    columns = [_tile_input([d[i][j] for i in range(4)]) for j in range(4)]
    return [v for i in range(4) for v in _tile_input([columns[j][i] for j in range(4)])]


def winograd_outputs(m: list[jax.Array], height: int, width: int) -> jax.Array:
    """A^T m A: 16 planes [B, th, tw, O] -> [B, height, width, O]."""
    b, th, tw, o = m[0].shape
    columns = [_tile_output([m[4 * i + j] for i in range(4)]) for j in range(4)]
    y = [_tile_output([columns[j][a] for j in range(4)]) for a in range(2)]
    y = jnp.stack([jnp.stack(row, 3) for row in y], 2)  # [B, th, 2, tw, 2, O]
    return y.reshape(b, 2 * th, 2 * tw, o)[:, :height, :width]


def winograd_outputs_transposed(grad: jax.Array) -> list[jax.Array]:
    """The transpose of `winograd_outputs`: [B, H, W, O] -> 16 planes [B, th, tw, O]."""
    b, height, width, o = grad.shape
    th, tw = _tiles(height), _tiles(width)
    grad = jnp.pad(grad, ((0, 0), (0, 2 * th - height), (0, 2 * tw - width), (0, 0)))
    grad = grad.reshape(b, th, 2, tw, 2, o)
    rows = [_tile_output_transposed([grad[:, :, a, :, e] for e in range(2)]) for a in range(2)]
    columns = [_tile_output_transposed([rows[a][j] for a in range(2)]) for j in range(4)]
    return [columns[j][i] for i in range(4) for j in range(4)]


def _winograd(x: jax.Array, u: list[jax.Array], transposed: bool = False) -> jax.Array:
    """The Winograd convolution of x with transformed kernels u ([I, O] each, or [O, I] used
    transposed)."""
    v = winograd_inputs(x)
    contract = 1 if transposed else 0
    m = [lax.dot_general(v[i], u[i], (((3,), (contract,)), ((), ()))) for i in range(16)]
    return winograd_outputs(m, *x.shape[1:3])


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, padding 1 (SAME), as Winograd F(2x2, 3x3).

    `winograd_with_vjp` is the same function with the hand-written gradient (module doc).

    Args:
      x: [B, H, W, I] (NHWC); odd H and W are padded to even and the output cropped.
      kernel: [3, 3, I, O] (HWIO, as `nn.Conv`'s).

    Returns:
      [B, H, W, O], equal to `lax.conv_general_dilated` with padding 1 to float32 round-off.
    """
    return _winograd(x, winograd_kernels(kernel))


def _winograd_with_policy(x, kernel, policy):
    return winograd_conv3x3(x, kernel)


def _winograd_forward(x, kernel, policy):
    x = one_buffer(x) if policy.winograd_input_buffer else x
    u = winograd_kernels(kernel)
    return _winograd(x, u), (x, u)


# G of a reversed kernel row is G of the row with its first and last entries swapped, so the
# transformed kernels of the flipped kernel are u's with tile rows and columns 0 and 3 swapped.
_FLIPPED_TILE = [
    4 * (3 - i if i in (0, 3) else i) + (3 - j if j in (0, 3) else j)
    for i in range(4)
    for j in range(4)
]


def _winograd_backward(policy, residuals, grad):
    """Input gradient: the Winograd convolution of the output gradient with the kernel flipped
    and its channels swapped (the forward's transformed kernels, reordered, used transposed);
    kernel gradient: G^T (sum over tiles of the transformed input x the transposed output
    transform of grad) G, 16 matmuls whose contracted (tile) dimension is the leading one of
    both, so one operand is written transposed first (as zoo/cpu/matmul.py does)."""
    x, u = residuals
    grad = grad.astype(x.dtype)
    grad = one_buffer(grad) if policy.winograd_gradient_buffer else grad
    grad_x = _winograd(grad, [u[t] for t in _FLIPPED_TILE], transposed=True)
    v, m = winograd_inputs(x), winograd_outputs_transposed(grad)
    cin, cout = u[0].shape
    grad_u = [
        transposed_buffer(v[i].reshape(-1, cin), policy.transpose_in_branches)
        @ m[i].reshape(-1, cout)
        for i in range(16)
    ]
    return grad_x, winograd_kernels_transposed(grad_u).astype(u[0].dtype)


# The policy is static (hashable): nondiff_argnums.
winograd_with_vjp = jax.custom_vjp(_winograd_with_policy, nondiff_argnums=(2,))
winograd_with_vjp.defvjp(_winograd_forward, _winograd_backward)
