"""Seconds per training step and the profiler's op table: ``python benchmarks/train_step_profile.py
vim_tiny --profile``.

See ``esh/bench/train_step_profile.py``.
"""

from esh.bench.train_step_profile import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
