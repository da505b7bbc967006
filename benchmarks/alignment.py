"""Alignment metrics at scale: ``python benchmarks/alignment.py [--n 50000 --d 768 --k 10]``.

See ``esh/bench/alignment.py``.
"""

from esh.bench.alignment import main

if __name__ == "__main__":
    main()
