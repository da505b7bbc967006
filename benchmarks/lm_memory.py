"""Peak memory of one ESH LM training step: ``python benchmarks/lm_memory.py [--sizes small medium large]``.

See ``esh/bench/lm_memory.py``.
"""

from esh.bench.lm_memory import main

if __name__ == "__main__":
    main()
