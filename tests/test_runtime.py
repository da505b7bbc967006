"""esh.runtime: the glibc allocator settings the command and the benchmarks apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from esh import runtime


def test_bad_thresholds_are_clear_errors():
    with pytest.raises(ValueError, match="mmap_threshold must be in"):
        runtime.tune_cpu_allocator(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="trim_threshold must be a positive"):
        runtime.tune_cpu_allocator(trim_threshold=0)


def test_environment_opt_out(monkeypatch):
    monkeypatch.setenv("ESH_CPU_ALLOCATOR", "default")
    assert runtime.tune_cpu_allocator() is False
    monkeypatch.delenv("ESH_CPU_ALLOCATOR")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert runtime.tune_cpu_allocator() is False


_HEAP = """
import ctypes, sys, torch
from esh import runtime
if sys.argv[1] == "tuned":
    assert runtime.tune_cpu_allocator()


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = runtime._libc()
libc.mallinfo2.restype = MallInfo2
mapped = libc.mallinfo2().hblkhd
x = torch.empty(1 << 22)  # 16 MiB, as an activation of a small model
mapped = libc.mallinfo2().hblkhd - mapped
del x
kept = libc.mallinfo2().fordblks
# a training loop's steps: the same buffer allocated and freed again and again. Each aligned
# allocation asks for a little more than the freed block holds, so the heap may hold two such
# blocks (alternating) before it stops growing; what matters is that it does stop.
ptrs, arenas = [], []
for _ in range(20):
    y = torch.empty(1 << 22)
    ptrs.append(y.data_ptr())
    del y
    arenas.append(libc.mallinfo2().arena)
reused = len(set(ptrs[2:])) <= 2 and arenas[-1] == arenas[2]
print(mapped >= 1 << 24, kept >= 1 << 24, reused)
"""


@pytest.mark.skipif(runtime._libc() is None or not hasattr(runtime._libc(), "mallinfo2"), reason="glibc >= 2.33")
def test_tuned_allocator_keeps_freed_tensors_in_the_heap_for_reuse():
    def heap(mode):
        env = {k: v for k, v in os.environ.items() if k not in ("ESH_CPU_ALLOCATOR", "LD_PRELOAD")}
        out = subprocess.run([sys.executable, "-c", _HEAP, mode], capture_output=True, text=True, env=env, check=True)
        return out.stdout.split()[-3:]

    # glibc's defaults map a 16 MiB buffer on its own and unmap it when freed, so the next
    # step faults its pages in again (1,000 to 163,000 page faults per 20 steps of a small
    # workload here, varying with glibc's dynamic threshold and the kernel's huge pages)
    assert heap("default")[0] == "True"
    # tuned, it comes from the heap, stays there when freed and is handed out again: twenty
    # allocate-and-free rounds settle on at most two blocks and the heap stops growing
    assert heap("tuned") == ["False", "True", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_peak_measurement_restores_the_tuned_settings(monkeypatch):
    from esh.bench import measure

    calls = []
    monkeypatch.setattr(runtime, "_reapply", lambda: calls.append("reapplied"))
    measure.peak_memory(lambda: torch.ones(1000).sum())
    assert calls == ["reapplied"]
