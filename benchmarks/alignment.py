"""Alignment metrics at scale: ``python benchmarks/alignment.py [--n 50000 --d 768 --k 10]``.

See ``esh/bench/alignment.py``.
"""

from esh.bench.alignment import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
