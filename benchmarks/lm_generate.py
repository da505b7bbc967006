"""LM decoding speed: ``python benchmarks/lm_generate.py [--contexts 128 512 2048 8192]``.

See ``esh/bench/lm_generate.py``.
"""

from esh.bench.lm_generate import main

if __name__ == "__main__":
    main()
