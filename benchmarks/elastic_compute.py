"""Elastic compute of ESH-Vision: ``python benchmarks/elastic_compute.py [--images photos]``.

The same as ``esh bench elastic``; see ``esh/bench/elastic_compute.py``.
"""

from esh.bench.elastic_compute import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
