"""XLA:CPU and allocator settings that zoo applies when it is imported, before JAX starts its
CPU backend.

jaxlib 0.10 hands three kinds of CPU work to the YNNPACK library by default: single matmuls,
reductions and single convolutions (`--xla_cpu_experimental_ynn_fusion_type=
individual_dot,individual_convolution,reduce`). YNNPACK's convolutions are slow, above all
their gradients (3x3, 64 channels, 16x56x56: forward 62 vs 36 ms, forward + both gradients
499 vs 121 ms with XLA's own convolution; 2-core Zen3, float32). zoo therefore sets

    --xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce

appended to the user's XLA_FLAGS (nothing of theirs is replaced; a user who sets this flag,
or the oneDNN one below, keeps their value and gets none of zoo's). Whole models
(benchmarks/throughput.py, and SPEED.md there): resnet20 training 68 -> 179 img/s, inference
654 -> 942; efficientnet_b0 6.05 -> 6.78 and 47.5 -> 51.5. YNNPACK's "reduce" fusions matter
for training: without them (only "individual_dot") efficientnet_b0 trains at 2.8 instead of
5.8 img/s and convnext_tiny at 1.0 instead of 2.3 (the LayerNorm and normalisation
gradients; measured while the depthwise kernel gradients were still YNNPACK reductions,
which they no longer are: `zoo.models.conv` makes them one variadic reduction that YNNPACK
does not take).

Forward-only programs want the opposite: a "reduce" fusion takes the LayerNorm in front of
a matmul, and the depthwise convolution before it, into one YNNPACK call that runs slower
than XLA's own loops (convnext_tiny inference 5.5 -> 9.6 img/s without it, swin_tiny 8.2
-> 9.2, vit_small 9.6 -> 10.0, efficientnet_b0 equal). zoo's evaluation step, `Classifier`
and the benchmark's inference therefore compile with `forward_compiler_options()`
(no "reduce" fusions for that one program; its matmuls in oneDNN on Intel and AMD CPUs,
below, in YNNPACK on others). The flags only concern the CPU backend; GPU/TPU runs are
unaffected.

On Intel CPUs the matmuls go to oneDNN, which jaxlib's x86-64 wheels also carry, instead of
YNNPACK (`cpu_flags`):

    --xla_cpu_experimental_ynn_fusion_type=reduce --xla_cpu_use_onednn=true
    --xla_cpu_experimental_onednn_fusion_type=individual_dot

On a 2-core Xeon (Emerald Rapids), where PyTorch's MKL had run convnext_tiny's matmuls in its
train step 1.9x as fast as YNNPACK, whole steps with oneDNN's matmuls against YNNPACK's, per
round (5-6 rounds): training convnext_tiny 1.12x, vit_small 1.13x, swin_tiny 1.13x,
resnet18-CIFAR 1.11x, resnet50 1.04x, efficientnet_b0 0.93x (its narrow 1x1 convolutions);
inference against XLA's own (Eigen) matmuls, which forward programs there used before:
swin_tiny 1.36x, resnet18-CIFAR 1.25x, resnet20 1.19x, vit_small 1.04x, resnet50 0.99x,
convnext_tiny 0.98x, efficientnet_b0 0.92x (benchmarks/SPEED.md). Only single matmuls
("individual_dot"): oneDNN's "dot" fusions also take in the elementwise producers of a
matmul's operands, and oneDNN failed to compile one (convnext_tiny's head after its
LayerNorm: "partition compile failed", and the process ended). AMD CPUs keep YNNPACK's
matmuls for training, where oneDNN's were not better on a 2-core Zen5 beyond its noise
(train steps per round against YNNPACK's, repeated: swin_tiny 0.85x, 0.99x, 1.09x; vit_small
0.97x, 1.18x; resnet18-CIFAR 1.075x, 0.99x; efficientnet_b0 0.96x twice; resnet50 1.02x,
convnext_tiny 1.01x, resnet20 0.99x) nor on a 2-core Zen4 (convnext_tiny 1.04x, then 0.99x;
swin_tiny 1.05x; vit_small 0.99x), but their forward-only programs take oneDNN's too
(`forward_matmuls_in_onednn`, per program: `forward_compiler_options`): inference there, per
round against YNNPACK's, vit_small 1.27x, convnext_tiny 1.26x, swin_tiny 1.14x, resnet50
1.08x, resnet20 1.04x, resnet18-CIFAR 0.96x (1.05x in a second run of 8 rounds),
efficientnet_b0 0.93x (6 rounds each).

The allocator (`keep_freed_memory`, Linux with glibc). XLA:CPU allocates one temporary
buffer per execution of a program (3.06 GB for swin_tiny's training step at batch 16) and
frees it afterwards. glibc serves every allocation above 32 MB with a fresh `mmap` and returns
it to the kernel on `free`, so each step first-touches every page of that buffer again:
~780,000 page faults per training step for swin_tiny and convnext_tiny, ~585,000 for
resnet50 (`resource.getrusage().ru_minflt`). zoo therefore sets, with glibc's `mallopt`,
one malloc arena for all threads (`M_ARENA_MAX`=1: XLA's worker threads allocate those
buffers, and only the main arena can grow past 64 MB without `mmap`), no `mmap` for large
blocks (`M_MMAP_MAX`=0) and no trimming of the heap's top (`M_TRIM_THRESHOLD`=max). Freed
memory then stays with the process and the next step reuses it: no page faults per step, and
training at batch 16 (benchmarks/throughput.py; SPEED.md) swin_tiny 1.84 -> 2.79 img/s,
convnext_tiny 2.07 -> 3.11, efficientnet_b0 6.47 -> 9.33, resnet50 2.39 -> 2.73. The cost:
the process keeps its peak heap until it exits, like a GPU allocator's cache (on a 2-core
Zen4 the heap also grew: XLA allocates the next step's block before it frees the last one's,
small allocations between steps split freed blocks, and the next step's block went to fresh
memory until about three blocks took turns; efficientnet_b0 at batch 16 held 9.0 GB from its
10th step on, against 3.2 GB after its first, benchmarks/SPEED.md: opt out when memory is
tight), and all
threads share one arena (compiling takes up to 1.35x as long: swin_tiny's train step
24.6 -> 32.0 s; a small job that faults little to begin with loses time: the default
`python train.py` 148 -> 180 s, README "Results"; its config therefore turns them off:
`keep_freed_memory` in configs/common.py). PyTorch in the same process (the
benchmark's timm rows) gets the same allocator. An arena is tied to a thread at its first
allocation, so this too has to happen before JAX starts its threads.

Opt out of both with `ZOO_XLA_DEFAULTS=0` in the environment, of the allocator settings
alone with `ZOO_KEEP_FREED_MEMORY=0`. XLA reads its flags once, when the
first JAX computation starts the backend: if that already happened before `import zoo`
(a notebook that ran JAX first), zoo warns and leaves the flags as they are.
`zoo.models.conv` reads the setting in effect (`ynn_convolutions()`) to pick its routes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

CPU_YNN_FUSION_TYPES = "individual_dot,reduce"
# The same option for one compilation (jax.jit(compiler_options=...)) takes the enum's name.
# On Intel CPUs, forward programs give YNNPACK nothing (`forward_ynn_fusion_type`): their
# matmuls are oneDNN's (`cpu_flags`), and their reductions XLA's, as everywhere.
FORWARD_YNN_FUSION_TYPE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
INTEL_YNN_FUSION_TYPES = "reduce"
ONEDNN_FLAG = "--xla_cpu_experimental_onednn_fusion_type"
ONEDNN_FLAGS = f"--xla_cpu_use_onednn=true {ONEDNN_FLAG}=individual_dot"
ONEDNN_OPTIONS = {  # the same for one compilation
    "xla_cpu_use_onednn": True,
    ONEDNN_FLAG.removeprefix("--"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA rewrites a reduction over more than 32 elements into sums over windows of 32
# (reduce-window) and a sum of those, for the accuracy of long float32 sums. In a forward
# program that is an extra pass over the softmax's and LayerNorm's inputs: inference per
# round, 2-core Zen4, batch 64: swin_tiny 1.062x (3 of 3 rounds), convnext_tiny 1.026x (4 of
# 4), vit_small 1.018x (4 of 4). The logits of the five families moved by at most 1.6e-6
# (random weights), as much as between zoo's forward options and the process's.
FORWARD_DISABLED_PASSES = "tree_reduction_rewriter"
DISABLE_PASSES_OPTION = "xla_disable_hlo_passes"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
JAXLIB_DEFAULT = "individual_dot,individual_convolution,reduce"  # jaxlib 0.10 without the flag
OPT_OUT = "ZOO_XLA_DEFAULTS"
KEEP_OPT_OUT = "ZOO_KEEP_FREED_MEMORY"
freed_memory_kept = False  # whether apply_cpu_flags set keep_freed_memory's allocator settings


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a jax without this private helper: assume not
        return False


def apply_cpu_flags() -> str:
    """Append zoo's XLA:CPU flags to XLA_FLAGS and keep freed memory in the process
    (`keep_freed_memory`); returns the flags appended ("" if none)."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return ""
    if _backend_started():
        warnings.warn(
            "zoo was imported after JAX started its backend, so zoo's XLA:CPU flags "
            f"{cpu_flags(cpu_vendor())} (faster training and inference on CPU) and its "
            "allocator settings (no page faults on every step's temporary buffer) are not in "
            "effect. Import zoo before running any JAX computation, or set them yourself "
            "before Python starts (the flags in XLA_FLAGS; MALLOC_ARENA_MAX=1 "
            "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000) or silence this with "
            f"{OPT_OUT}=0.",
            stacklevel=3,
        )
        return ""
    global freed_memory_kept
    if os.environ.get(KEEP_OPT_OUT, "1") != "0":
        freed_memory_kept = keep_freed_memory()
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG + "=" in flags or ONEDNN_FLAG + "=" in flags:
        return ""
    added = cpu_flags(cpu_vendor())
    os.environ["XLA_FLAGS"] = f"{flags} {added}".strip()
    return added


def cpu_vendor() -> str:
    """The CPU's vendor ("GenuineIntel", "AuthenticAMD", ...) from Linux's /proc/cpuinfo; ""
    where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """One malloc arena, no `mmap` for large blocks and no heap trimming (glibc's `mallopt`),
    so that memory XLA frees after a step is reused by the next one instead of being
    returned to the kernel and faulted in again (module doc). True if glibc took all three;
    False elsewhere (macOS, Windows, musl), where nothing is changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: SIZE_MAX
    return all([mallopt(param, value) == 1 for param, value in settings])


def ynn_fusion_types() -> frozenset[str]:
    """The YNNPACK fusion types XLA:CPU uses in this process, read from XLA_FLAGS (the last
    setting wins; jaxlib's default when unset)."""
    value = None
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith(YNN_FLAG + "="):
            value = flag.split("=", 1)[1]
    if value is None:
        return frozenset(JAXLIB_DEFAULT.split(","))
    return frozenset(t for t in value.split(",") if t)


def ynn_convolutions() -> bool:
    """Whether XLA:CPU runs convolutions with YNNPACK (slow gradients; see the module doc)."""
    return "individual_convolution" in ynn_fusion_types()


def matmuls_in_onednn(vendor: str) -> bool:
    """Whether zoo gives a CPU of this vendor's matmuls to oneDNN (Intel) rather than YNNPACK
    (module doc)."""
    return vendor == "GenuineIntel"


def cpu_ynn_fusion_types(vendor: str) -> str:
    """What zoo hands YNNPACK on a CPU of this vendor: reductions, and matmuls unless they
    go to oneDNN (`matmuls_in_onednn`)."""
    return INTEL_YNN_FUSION_TYPES if matmuls_in_onednn(vendor) else CPU_YNN_FUSION_TYPES


def cpu_flags(vendor: str) -> str:
    """zoo's XLA:CPU flags for a CPU of this vendor (module doc)."""
    flags = f"{YNN_FLAG}={cpu_ynn_fusion_types(vendor)}"
    return f"{flags} {ONEDNN_FLAGS}" if matmuls_in_onednn(vendor) else flags


def forward_matmuls_in_onednn(vendor: str) -> bool:
    """Whether a forward-only program's matmuls go to oneDNN on a CPU of this vendor: on
    Intel's and AMD's (jaxlib's x86-64 wheels carry oneDNN; module doc)."""
    return vendor in ("GenuineIntel", "AuthenticAMD")


def forward_ynn_fusion_type(vendor: str) -> str:
    """What a forward-only program hands YNNPACK: single matmuls, or nothing where the
    matmuls are oneDNN's (`forward_matmuls_in_onednn`)."""
    return "" if forward_matmuls_in_onednn(vendor) else FORWARD_YNN_FUSION_TYPE


# A program that runs once, the parameters' initialisation above all, compiles with LLVM at
# -O1 (XLA's default is -O2): its random initialisers (threefry, erf_inv) are many fusions
# whose compile time dwarfs their run time. Compile + run of `jax.jit(model.init)` on a
# 2-core Zen4, -O2 -> -O1, with the same bits out for all seven models: resnet8 5.2 -> 1.9 s,
# resnet20 6.5 -> 2.5, resnet50 13.2 -> 7.3, efficientnet_b0 22.5 -> 14.3, convnext_tiny
# 11.7 -> 7.2, swin_tiny 11.2 -> 8.7, vit_small 5.6 -> 3.9 (-O0 was faster to compile still,
# but its float results moved by up to 3e-7 relative).
ONCE_OPTIMIZATION_LEVEL = 1


def once_compiler_options() -> dict[str, int]:
    """`compiler_options` for a `jax.jit` that runs once (parameter initialisation): LLVM at
    -O1, same results, less compile time (`ONCE_OPTIMIZATION_LEVEL`). Empty off the CPU and
    with `ZOO_XLA_DEFAULTS=0`. Starts JAX's backend: call it when compiling."""
    import jax

    if os.environ.get(OPT_OUT, "1") == "0" or jax.default_backend() != "cpu":
        return {}
    return {"xla_backend_optimization_level": ONCE_OPTIMIZATION_LEVEL}


def forward_compiler_options() -> dict[str, str | bool]:
    """`compiler_options` for a forward-only `jax.jit` (evaluation, inference): single
    matmuls in oneDNN on Intel and AMD CPUs and in YNNPACK on others, nothing else in YNNPACK
    (module doc), and reductions without XLA's windowed rewrite (`FORWARD_DISABLED_PASSES`;
    left out when XLA_FLAGS names passes to disable itself).
    Empty, i.e. the process-wide setting, when zoo's flag is not the one in effect
    (`ZOO_XLA_DEFAULTS=0`, or the user's own value of the flag) or the default backend is not
    the CPU. Starts JAX's backend: call it when compiling."""
    vendor = cpu_vendor()
    if ynn_fusion_types() != frozenset(cpu_ynn_fusion_types(vendor).split(",")):
        return {}
    import jax

    if jax.default_backend() != "cpu":
        return {}
    options = {YNN_OPTION: forward_ynn_fusion_type(vendor)}
    if forward_matmuls_in_onednn(vendor):
        options.update(ONEDNN_OPTIONS)
    if f"--{DISABLE_PASSES_OPTION}" not in os.environ.get("XLA_FLAGS", ""):
        options[DISABLE_PASSES_OPTION] = FORWARD_DISABLED_PASSES
    return options


def one_buffer(x):
    """`x` unchanged, computed into one buffer that XLA:CPU neither fuses into its consumers
    nor recomputes inside them.

    It is routed through a `lax.cond` whose predicate is only known at run time (XLA:CPU
    keeps the conditional; `lax.optimization_barrier` it removes before fusion). Both
    branches are the identity: the predicate is False only when the first element is NaN,
    and then `x + 0` passes it through unchanged. Used where a YNNPACK fusion would otherwise
    take a large elementwise producer in and need each of its operands as a buffer
    (`zoo.models.conv.depthwise_conv`), and for residual-stream gradients
    (`zoo.models.layers.block_input`).
    """
    from jax import lax

    first = x.reshape(-1)[0]
    return lax.cond(first == first, lambda v: v, lambda v: v + 0, x)


# `transposed_buffer` transposes inside the conditional's branches. With the transpose outside
# (`one_buffer(x.T)`), XLA:CPU gave the transpose's producer (e.g. Winograd's input transform)
# a transposed output layout, which it wrote with a stride, and the branch's copy turned it
# back; inside the branches the transpose is a bitcast, the producer writes its plain layout,
# and one copy after the conditional transposes. resnet18-CIFAR's train step at batch 128
# (Winograd's kernel gradient: 16 such buffers per 3x3 convolution), 2-core Zen5, per round:
# 1.072x and 1.064x (7 of 8 rounds faster, both) for the Winograd buffers alone, 1.031x (8 of
# 8) for all; resnet50 at 16 0.994x (4 of 8) and 1.040x (4 of 6); with and without it at the
# matmuls' and attention's buffers: convnext_tiny 1.021x (6 of 6), efficientnet_b0 1.021x
# (3 of 6), swin_tiny 1.005x (3 of 6), vit_small 0.999x (3 of 6).
TRANSPOSE_IN_BRANCHES = True  # False (before tracing): one_buffer(jnp.swapaxes(x, -1, -2))


def transposed_buffer(x):
    """x with its last two axes swapped, as one buffer (`one_buffer`'s conditional) that XLA:CPU
    does not fold back into the matmul reading it: the operand of a kernel gradient whose
    rows are contracted (`zoo.models.conv.matmul`, Winograd's kernel gradient, attention's
    gradient), which YNNPACK takes only in the plain [K, N] layout."""
    import jax.numpy as jnp
    from jax import lax

    def swap(v):
        return jnp.swapaxes(v, -1, -2)

    if not TRANSPOSE_IN_BRANCHES:
        return one_buffer(swap(x))
    first = x.reshape(-1)[0]
    return lax.cond(first == first, swap, lambda v: swap(v) + 0, x)
