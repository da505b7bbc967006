"""Peak memory of one ESH LM training step: ``python benchmarks/lm_memory.py [--sizes small medium large]``.

See ``esh/bench/lm_memory.py``.
"""

from esh.bench.lm_memory import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
