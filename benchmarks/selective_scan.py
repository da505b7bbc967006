"""Selective-scan benchmark: ``python benchmarks/selective_scan.py [--quick] [--shape B,D,L,N]``.

The same as ``esh bench scan``; see ``esh/bench/selective_scan.py`` for what is measured.
"""

from esh.bench.selective_scan import main

if __name__ == "__main__":
    main()
