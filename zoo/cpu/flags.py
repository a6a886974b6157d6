"""zoo's XLA:CPU flags, appended to XLA_FLAGS by `import zoo` before JAX starts its backend,
and the compiler options of forward-only and run-once programs.

jaxlib 0.10 hands single matmuls, reductions and single convolutions to the YNNPACK library;
YNNPACK's convolution gradients are slow, so zoo keeps matmuls and reductions there and the
convolutions in XLA (`cpu_flags`). On Intel CPUs the matmuls go to oneDNN instead. Forward-only
programs (evaluation, inference) want no YNNPACK reductions, oneDNN's matmuls on Intel and
AMD, and no windowed rewrite of long reductions (`forward_compiler_options`); programs that
run once compile at LLVM -O1 (`once_compiler_options`). The measurements behind each choice:
benchmarks/SPEED.md, "How zoo sets up XLA:CPU and glibc" and "CPU policy fields".

A user's own setting of the YNNPACK or oneDNN flag wins (zoo adds none of its own), and
`ZOO_XLA_DEFAULTS=0` turns all of this off. XLA reads its flags once, when the first JAX
computation starts the backend: importing zoo after that leaves them as they are, with a
warning.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
ONEDNN_FLAG = "--xla_cpu_experimental_onednn_fusion_type"
ONEDNN_FLAGS = f"--xla_cpu_use_onednn=true {ONEDNN_FLAG}=individual_dot"
CPU_YNN_FUSION_TYPES = "individual_dot,reduce"
INTEL_YNN_FUSION_TYPES = "reduce"  # Intel's matmuls are oneDNN's
JAXLIB_DEFAULT = "individual_dot,individual_convolution,reduce"  # jaxlib 0.10 without the flag
# The same settings for one compilation (jax.jit(compiler_options=...)) take the enum's names.
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
FORWARD_YNN_FUSION_TYPE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
ONEDNN_OPTIONS = {
    "xla_cpu_use_onednn": True,
    ONEDNN_FLAG.removeprefix("--"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
DISABLE_PASSES_OPTION = "xla_disable_hlo_passes"
# XLA rewrites a reduction over more than 32 elements into sums over windows of 32, an extra
# pass over the softmax's and LayerNorm's inputs in a forward program.
FORWARD_DISABLED_PASSES = "tree_reduction_rewriter"
# A program that runs once (parameter initialisation) compiles at LLVM -O1: its random
# initialisers are many fusions whose compile time dwarfs their run time; same bits out.
ONCE_OPTIMIZATION_LEVEL = 1
OPT_OUT = "ZOO_XLA_DEFAULTS"


def opted_out() -> bool:
    return os.environ.get(OPT_OUT, "1") == "0"


def _backend_started() -> bool:
    """Whether JAX has started a backend; False without looking when JAX is not even imported
    (a private helper of JAX's is probed only when it is)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a jax without this private helper: assume not
        return False


def apply_cpu_flags() -> str:
    """Appends zoo's XLA:CPU flags to XLA_FLAGS; returns what it appended ("" if nothing)."""
    if opted_out():
        return ""
    if _backend_started():
        warnings.warn(
            "zoo was imported after JAX started its backend, so zoo's XLA:CPU flags "
            f"{cpu_flags(cpu_vendor())} (faster training and inference on CPU) are not in "
            "effect. Import zoo before running any JAX computation, or put them in XLA_FLAGS "
            f"before Python starts, or silence this with {OPT_OUT}=0.",
            stacklevel=3,
        )
        return ""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG + "=" in flags or ONEDNN_FLAG + "=" in flags:
        return ""
    added = cpu_flags(cpu_vendor())
    os.environ["XLA_FLAGS"] = f"{flags} {added}".strip()
    return added


@functools.cache
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


def matmuls_in_onednn(vendor: str) -> bool:
    """Whether zoo gives a CPU of this vendor's matmuls to oneDNN (Intel) rather than YNNPACK."""
    return vendor == "GenuineIntel"


def cpu_ynn_fusion_types(vendor: str) -> str:
    """What zoo hands YNNPACK on a CPU of this vendor: reductions, and matmuls unless they go
    to oneDNN."""
    return INTEL_YNN_FUSION_TYPES if matmuls_in_onednn(vendor) else CPU_YNN_FUSION_TYPES


def cpu_flags(vendor: str) -> str:
    """zoo's XLA:CPU flags for a CPU of this vendor."""
    flags = f"{YNN_FLAG}={cpu_ynn_fusion_types(vendor)}"
    return f"{flags} {ONEDNN_FLAGS}" if matmuls_in_onednn(vendor) else flags


def forward_matmuls_in_onednn(vendor: str) -> bool:
    """Whether a forward-only program's matmuls go to oneDNN: on Intel's and AMD's CPUs
    (jaxlib's x86-64 wheels carry oneDNN)."""
    return vendor in ("GenuineIntel", "AuthenticAMD")


def forward_ynn_fusion_type(vendor: str) -> str:
    """What a forward-only program hands YNNPACK: single matmuls, or nothing where the
    matmuls are oneDNN's."""
    return "" if forward_matmuls_in_onednn(vendor) else FORWARD_YNN_FUSION_TYPE


def once_compiler_options(platform: str) -> dict[str, int]:
    """`compiler_options` for a `jax.jit` that runs once on `platform` (parameter
    initialisation): LLVM at -O1. Empty off the CPU and with `ZOO_XLA_DEFAULTS=0`."""
    if opted_out() or platform != "cpu":
        return {}
    return {"xla_backend_optimization_level": ONCE_OPTIMIZATION_LEVEL}


def forward_compiler_options(platform: str) -> dict[str, str | bool]:
    """`compiler_options` for a forward-only `jax.jit` on `platform` (evaluation, inference):
    single matmuls in oneDNN on Intel and AMD CPUs and in YNNPACK on others, nothing else in
    YNNPACK, and reductions without XLA's windowed rewrite (left out when XLA_FLAGS names
    passes to disable itself). Empty, i.e. the process-wide setting, off the CPU and when
    zoo's flag is not the one in effect (`ZOO_XLA_DEFAULTS=0`, or the user's own value)."""
    vendor = cpu_vendor()
    zoo_flags = frozenset(cpu_ynn_fusion_types(vendor).split(","))
    if platform != "cpu" or ynn_fusion_types() != zoo_flags:
        return {}
    options: dict[str, str | bool] = {YNN_OPTION: forward_ynn_fusion_type(vendor)}
    if forward_matmuls_in_onednn(vendor):
        options.update(ONEDNN_OPTIONS)
    if f"--{DISABLE_PASSES_OPTION}" not in os.environ.get("XLA_FLAGS", ""):
        options[DISABLE_PASSES_OPTION] = FORWARD_DISABLED_PASSES
    return options
