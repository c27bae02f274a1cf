"""Keep freed host memory inside the process while the model trains on the CPU.

By default glibc hands large freed blocks back to the kernel (blocks above its mmap threshold, and
the heap's top above its trim threshold). A CPU training step frees its activations at the end and
allocates them again at the start of the next, so every step pays for the kernel to map and zero
the same pages again. Keeping them in the process is what the jemalloc/tcmalloc advice in PyTorch's
CPU tuning guide buys, without preloading another allocator. Measured on 2 cores (ResNet18, batch 4,
bf16): system time about halved, a finetune epoch's train part about 7% and its val part about 15%
faster. The price: the process keeps its peak host memory until it exits, not less.
"""
from __future__ import annotations

import ctypes


# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1


M_TOP_PAD = -2


M_MMAP_THRESHOLD = -3


MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems; larger blocks are still mmapped


TOP_PAD = 64 << 20  # grow the heap in large steps, not one activation at a time


TRIM_THRESHOLD = 2**31 - 1  # the largest value the int argument holds: in practice, never trim


def keep_freed_memory() -> bool:
    """Tune this process's allocator as above. Returns whether it took effect (glibc only; with
    another C library, e.g. on macOS, nothing changes and this returns False)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TOP_PAD, TOP_PAD),
          mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(r == 1 for r in ok)
