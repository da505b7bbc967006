"""Process-wide settings for fast eager PyTorch on the CPU.

glibc's ``malloc`` serves every buffer above its mmap threshold (128 KiB, raised on the fly
up to 32 MiB) straight from the kernel and hands it back when it is freed, and trims the top
of its heap as soon as 128 KiB lie free there. In eager PyTorch every activation is a fresh
tensor of a few MiB, so each one page-faults on first touch: about 100,000 page faults, or a
third of the time, per Vim-tiny batch of 8 at 224 x 224 on a 2-core machine. PyTorch's own CPU
guidance swaps in jemalloc or tcmalloc for the same reason (``torch.backends.xeon.run_cpu``).

:func:`tune_cpu_allocator` keeps glibc's freed buffers of up to 32 MiB in the heap for reuse
instead. The price is that a process's resident size no longer shrinks after a peak. The
``esh`` command and the benchmarks call it at start; a library user calls it once. It does
nothing where it cannot help: not Linux with glibc, jemalloc or tcmalloc preloaded, or
``ESH_CPU_ALLOCATOR=default`` in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

from esh.errors import InputError

__all__ = ["cpu_allocator_tuned", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems
_MAX_MMAP_THRESHOLD = 32 << 20

_tuned: tuple[int, int] | None = None


@functools.cache
def _libc():
    """glibc, loaded once (find_library runs ldconfig), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator(mmap_threshold: int = _MAX_MMAP_THRESHOLD, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed CPU tensor memory in glibc's heap for reuse (see the module docstring).

    ``mmap_threshold``: buffers up to this size come from the heap (at most 32 MiB, glibc's
    limit); ``trim_threshold``: free memory at the top of the heap that is kept before any is
    returned to the OS. Returns True when the settings were applied. Safe to call repeatedly.
    """
    global _tuned
    if not 0 < mmap_threshold <= _MAX_MMAP_THRESHOLD:
        raise InputError(
            f"mmap_threshold must be in (0, {_MAX_MMAP_THRESHOLD}] bytes (glibc's limit), got {mmap_threshold}"
        )
    if trim_threshold <= 0:
        raise InputError(f"trim_threshold must be a positive number of bytes, got {trim_threshold}")
    if os.environ.get("ESH_CPU_ALLOCATOR", "").lower() == "default":
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if ok:
        _tuned = (mmap_threshold, trim_threshold)
    return ok


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` applied its settings in this process."""
    return _tuned is not None


def _reapply() -> None:
    """Restore the tuned settings after something (a peak-memory measurement) changed them."""
    if _tuned is not None:
        tune_cpu_allocator(*_tuned)
