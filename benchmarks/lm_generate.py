"""LM decoding speed: ``python benchmarks/lm_generate.py [--contexts 128 512 2048 8192]``.

See ``esh/bench/lm_generate.py``.
"""

from esh.bench.lm_generate import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
