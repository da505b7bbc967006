"""Vision throughput: ``python benchmarks/vision_throughput.py [--batches 8] [--models ...]``.

The same as ``esh bench vision``; see ``esh/bench/vision_throughput.py``.
"""

from esh.bench.vision_throughput import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
