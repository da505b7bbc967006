"""Training throughput: ``python benchmarks/train_throughput.py [--batch-size 16]``.

See ``esh/bench/train_throughput.py``.
"""

from esh.bench.train_throughput import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
