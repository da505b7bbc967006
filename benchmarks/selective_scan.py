"""Selective-scan benchmark: ``python benchmarks/selective_scan.py [--quick] [--shape B,D,L,N]``.

The same as ``esh bench scan``; see ``esh/bench/selective_scan.py`` for what is measured.
"""

from esh.bench.selective_scan import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
