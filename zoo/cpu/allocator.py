"""glibc's allocator set so that memory XLA:CPU frees after a step is reused by the next one.

XLA:CPU allocates a program's temporaries as one block per execution (3 GB for swin_tiny's
train step at batch 16) and frees it afterwards; glibc serves blocks above 32 MB with a fresh
`mmap` and returns them on `free`, so every step faults in every page again. With one malloc
arena, no `mmap` for large blocks and no heap trimming the next step reuses the block: 1.1-1.5x
faster training of the large models; the process keeps its peak heap until it exits (like a GPU
allocator's cache) and compiles up to 1.35x slower (benchmarks/SPEED.md, "How zoo sets up
XLA:CPU and glibc"). Irreversible, process-wide, and it changes PyTorch in the same process too,
so only entry points apply it (`train.py --keep_freed_memory`, `zoo.predict`, the benchmarks),
through `keep_freed_memory()`, before JAX starts its threads (an arena is tied to a thread at its
first allocation). `ZOO_KEEP_FREED_MEMORY=0` in the environment vetoes it.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "ZOO_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
kept = False  # whether `keep_freed_memory` changed glibc's settings in this process


def keep_freed_memory() -> bool:
    """One malloc arena, no `mmap` for large blocks and no heap trimming (glibc's `mallopt`).
    True if glibc took all three; False where nothing changed: `ZOO_KEEP_FREED_MEMORY=0`, or
    not glibc (macOS, Windows, musl)."""
    global kept
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: SIZE_MAX
    kept = all([mallopt(param, value) == 1 for param, value in settings]) or kept
    return kept
