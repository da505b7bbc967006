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


_FAULTS = """
import resource, sys, torch
from esh import runtime
if sys.argv[1] == "tuned":
    assert runtime.tune_cpu_allocator()
a = torch.randn(1 << 21)  # 8 MiB


def step():  # fresh tensors of 4 to 16 MiB, freed in another order than made, as a model's are
    x = a * 2
    y = x + 1
    z = torch.cat([x, y])
    del x
    w = z[: 1 << 20] * y[: 1 << 20]
    return w.sum() + z.sum()


for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(runtime._libc() is None, reason="needs glibc")
def test_tuned_allocator_reuses_freed_tensors_without_page_faults():
    def faults(mode):
        env = {k: v for k, v in os.environ.items() if k not in ("ESH_CPU_ALLOCATOR", "LD_PRELOAD")}
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.split()[-1])

    default, tuned = faults("default"), faults("tuned")
    # glibc's defaults hand the freed pages back and fault them in again, step after step
    # (20,000 to 160,000 faults here, with the kernel's huge pages or without); tuned, the freed
    # tensors are reused
    assert default > 2000, default
    assert tuned < default / 10, (tuned, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_peak_measurement_restores_the_tuned_settings(monkeypatch):
    from esh.bench import measure

    calls = []
    monkeypatch.setattr(runtime, "_reapply", lambda: calls.append("reapplied"))
    measure.peak_memory(lambda: torch.ones(1000).sum())
    assert calls == ["reapplied"]
