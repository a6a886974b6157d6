"""`CpuPolicy`: every switch of zoo's CPU routes, as one frozen (hashable) object, and which
policy a program is traced with.

A program is traced with the policy its compile site chose: zoo's compile sites
(`zoo.training.step.Parallel`, `zoo.inference`, the init in `zoo.training.loop`, the
benchmarks) wrap the function they compile in `traced(fn, policy_for(devices))`, so that a
different policy is a different jitted function, hence a different program. Code that
traces zoo's models itself (`jax.jit(model.apply)`) gets the process default on a CPU
backend, which is fixed at its first use (`set_default` afterwards is an error), and XLA's
native operations on any other backend.

    policy = CpuPolicy.from_flags()                      # today's routes (the default)
    plain = dataclasses.replace(policy, winograd=False)  # one route off
    step = jax.jit(traced(train_step, plain))            # its own program
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class CpuPolicy:
    """How zoo's building blocks compute on XLA:CPU. Every default is the faster choice as
    measured (benchmarks/SPEED.md, "CPU policy fields" names the measurement of each field);
    every alternative computes the same function (tests/test_cpu.py).

    Attributes:
      ynn_convolutions: XLA:CPU runs convolutions with YNNPACK (jaxlib's default flags; zoo's
        own turn it off): wide and large-kernel convolutions then take their kernel gradient
        as an im2col matmul.
      ynn_reductions: XLA:CPU runs reductions with YNNPACK (zoo's flags): a depthwise
        convolution's output is then one buffer (`depthwise_output_buffer`).
      winograd: 3x3 convolutions at stride 1 with `min_channels_for_winograd` channels in and
        out as Winograd's F(2x2, 3x3) (zoo/cpu/winograd.py).
      conv_input_buffer: XLA's convolution keeps its input for the backward pass as one buffer.
      min_channels_for_im2col_gradient, min_taps_for_im2col_gradient: which convolutions take
        the im2col kernel gradient under `ynn_convolutions`.
      matmul_kernel_gradient: dense layers and 1x1 convolutions compute their kernel gradient
        with the narrower operand transposed into a buffer (zoo/cpu/matmul.py).
      pointwise_gradient_buffer: a 1x1 convolution's output gradient is one buffer.
      transpose_in_branches: `transposed_buffer` transposes inside its conditional.
      depthwise_vjp: depthwise convolutions have a hand-written gradient.
      depthwise_gradient_from_spread: its kernel gradient reads the output gradient from the
        input gradient's padded buffer.
      depthwise_taps_per_reduction: kernel taps per variadic reduction of that gradient.
      depthwise_output_buffer: the depthwise output is one buffer (under `ynn_reductions`).
      winograd_input_buffer, winograd_gradient_buffer: Winograd keeps its input, and reads
        its output gradient, as one buffer.
      batch_norm_vjp, layer_norm_vjp, max_pool_vjp: hand-written gradients (zoo/cpu/norms.py).
      attention_vjp: attention has a hand-written gradient (zoo/cpu/attention.py).
      attention_slices, attention_gradient_slices: attention outside differentiation, and its
        gradient, computed for up to this many slices of the batch apart.
      min_slice_flops, min_tokens_for_gradient_slices: the smallest attention sliced.
      block_input_gradient_buffer: the gradient at a transformer block's input is one buffer.
      block_output_buffer: a ResNet block's output is one buffer.
      window_buffers: Swin's windows and their gradient are buffers while training.
    """

    ynn_convolutions: bool = False
    ynn_reductions: bool = True
    winograd: bool = True
    min_channels_for_winograd: int = 64
    conv_input_buffer: bool = True
    min_channels_for_im2col_gradient: int = 64
    min_taps_for_im2col_gradient: int = 25
    matmul_kernel_gradient: bool = True
    pointwise_gradient_buffer: bool = True
    transpose_in_branches: bool = True
    depthwise_vjp: bool = True
    depthwise_gradient_from_spread: bool = True
    depthwise_taps_per_reduction: int = 13
    depthwise_output_buffer: bool = True
    winograd_input_buffer: bool = True
    winograd_gradient_buffer: bool = True
    batch_norm_vjp: bool = True
    layer_norm_vjp: bool = True
    max_pool_vjp: bool = True
    attention_vjp: bool = True
    attention_slices: int = 16
    attention_gradient_slices: int = 8
    min_slice_flops: int = 8_000_000
    min_tokens_for_gradient_slices: int = 64
    block_input_gradient_buffer: bool = True
    block_output_buffer: bool = True
    window_buffers: bool = True

    @classmethod
    def from_flags(cls, **fields: Any) -> CpuPolicy:
        """The default policy for the XLA:CPU flags this process runs with (XLA reads them
        once, when its backend starts), with `fields` replaced."""
        from zoo.cpu import flags

        types = flags.ynn_fusion_types()
        found = dict(
            ynn_convolutions="individual_convolution" in types, ynn_reductions="reduce" in types
        )
        return cls(**{**found, **fields})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))


_default: CpuPolicy | None = None
_default_used = False
_local = threading.local()  # the stack of `using` contexts of this thread


def default() -> CpuPolicy:
    """The process default policy (`CpuPolicy.from_flags()` unless `set_default` chose one);
    fixed from its first use on."""
    global _default, _default_used
    if _default is None:
        _default = CpuPolicy.from_flags()
    _default_used = True
    return _default


def set_default(policy: CpuPolicy) -> None:
    """Chooses the process default policy; only before its first use (a program traced with
    it would otherwise keep the old routes in jit's cache). RuntimeError afterwards."""
    global _default
    if not isinstance(policy, CpuPolicy):
        raise TypeError(f"set_default takes a CpuPolicy, not {type(policy).__name__}")
    if _default_used and policy != _default:
        raise RuntimeError(
            "zoo.cpu.set_default: the default CPU policy was already used to trace a program, "
            "so changing it now would not change that program. Call set_default before the "
            "first model runs, or compile with `zoo.cpu.traced(fn, policy)` for a program "
            "with its own policy."
        )
    _default = policy


def policy_for(devices: Sequence[Any], policy: CpuPolicy | None = None) -> CpuPolicy | None:
    """The policy for a program compiled for `devices`: `policy` (default: the process
    default) where they are all CPU devices, None (XLA's native operations) otherwise. Over
    several devices attention is not sliced: the slices would cut a sharded batch across
    shards, and XLA moved them between devices (SPEED.md, "CPU policy fields")."""
    if not devices or any(device.platform != "cpu" for device in devices):
        return None
    policy = policy or default()
    if len(devices) > 1:
        policy = dataclasses.replace(policy, attention_slices=1, attention_gradient_slices=1)
    return policy


@contextlib.contextmanager
def using(policy: CpuPolicy | None) -> Iterator[None]:
    """Traces inside this context take `policy` (None: XLA's native operations). Only for a
    function jitted once per policy (`traced`): jit caches programs by function and
    arguments, not by this context."""
    if policy is not None and not isinstance(policy, CpuPolicy):
        raise TypeError(f"using takes a CpuPolicy or None, not {type(policy).__name__}")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(policy)
    try:
        yield
    finally:
        stack.pop()


def traced(fn: Callable, policy: CpuPolicy | None) -> Callable:
    """`fn` traced with `policy` (`using`): jit or pmap the result, once per policy."""

    @functools.wraps(fn)
    def with_policy(*args, **kwargs):
        with using(policy):
            return fn(*args, **kwargs)

    return with_policy


def current() -> CpuPolicy | None:
    """The policy of the trace in progress: the innermost `using`, else the process default
    for this process's local devices (None off the CPU)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    import jax

    return policy_for(jax.local_devices())
