"""Everything zoo does to be fast on CPU, in one place.

zoo's models are written with neutral building blocks (`zoo.models.conv.Conv`, `BatchNorm`,
`LayerNorm`, attention, residual helpers); on XLA:CPU those blocks take the routes in this
package, chosen by one frozen, hashable `CpuPolicy` (policy.py): convolutions as matmuls,
shifted multiply-adds or Winograd (conv.py, matmul.py, depthwise.py, winograd.py), hand-written
gradients of norms, pooling and attention (norms.py, attention.py), and buffers against
XLA:CPU's recomputation (buffers.py). On any other backend they are XLA's native operations.
The process-wide parts: XLA:CPU flags appended by `import zoo` (flags.py) and glibc's
allocator, set only by entry points (allocator.py). Why each piece exists, with its
measurements: benchmarks/SPEED.md, "How zoo sets up XLA:CPU and glibc" and "CPU policy
fields".

    import dataclasses, jax, zoo
    from zoo import cpu

    policy = dataclasses.replace(cpu.default(), winograd=False)
    forward = jax.jit(cpu.traced(model.apply, policy))  # its own program
"""

from zoo.cpu.allocator import keep_freed_memory
from zoo.cpu.flags import forward_compiler_options, once_compiler_options
from zoo.cpu.policy import (
    CpuPolicy,
    current,
    default,
    policy_for,
    set_default,
    traced,
    using,
)

__all__ = [
    "CpuPolicy",
    "current",
    "default",
    "forward_compiler_options",
    "keep_freed_memory",
    "once_compiler_options",
    "policy_for",
    "set_default",
    "traced",
    "using",
]
