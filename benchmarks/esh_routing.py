"""ESH-Vision's routing, measured: ``python benchmarks/esh_routing.py [--seeds 0 1 2] [--epochs 8]``.

The same as ``esh bench routing``; see ``esh/bench/esh_routing.py``.
"""

from esh.bench.esh_routing import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
