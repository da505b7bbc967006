"""Wall-clock time and peak memory of a callable, measured the same way for every method, and
the mean ± spread every benchmark table prints."""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from esh import runtime


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    max_seconds: float = 20.0,
    device: torch.device | None = None,
    best: bool = False,
) -> float:
    """Median (or with ``best``, minimum) seconds of ``repeats`` calls after ``warmup``
    calls; stops early after ``max_seconds`` of measuring (at least one timed call is made)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return min(times) if best else statistics.median(times)


def interleaved_medians(
    fns: Sequence[Callable[[], object]], rounds: int, max_seconds: float = 60.0, device: torch.device | None = None
) -> list[float]:
    """Median seconds of each callable over ``rounds`` rounds, each round calling every one once
    in turn, so that the load of other work on a shared machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, rounds)):
        for i, fn in enumerate(fns):
            times[i].append(time_call(fn, repeats=1, warmup=0, max_seconds=max_seconds, device=device))
    return [statistics.median(t) for t in times]


def mean_spread(values: Sequence[float | None], digits: int) -> str:
    """``mean ± sample standard deviation`` of the values that are numbers (None and NaN left
    out), the mean alone for one value, ``-`` for none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


def _return_freed_memory_to_os() -> None:
    """Make glibc map every buffer of 64 KiB or more on its own and unmap it when freed, so
    the resident set follows the live tensors (the default threshold grows to 32 MiB)."""
    libc = runtime._libc()
    if libc is not None:
        libc.mallopt(runtime._M_MMAP_THRESHOLD, 1 << 16)


def _trim_heap() -> None:
    """Hand free heap pages back to the OS, so that memory freed by earlier measurements is
    not silently reused (and so not counted) by the next one."""
    libc = runtime._libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory(fn: Callable[[], object], device: torch.device | None = None) -> int | None:
    """Bytes allocated at the peak of one call of ``fn`` above what was live before it.

    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set size (VmHWM, reset
    through /proc/self/clear_refs) over the resident size before the call. None elsewhere.
    """
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not _cpu_peak_supported():
        return None
    _return_freed_memory_to_os()
    fn()  # first call after the malloc change: let allocations settle
    gc.collect()
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _status_bytes("VmRSS:")
    try:
        fn()
        return max(0, _status_bytes("VmHWM:") - base)
    finally:
        runtime._reapply()  # the fast allocator settings again, if the process had them
