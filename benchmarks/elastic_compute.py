"""Elastic compute of ESH-Vision: ``python benchmarks/elastic_compute.py [--images photos]``.

The same as ``esh bench elastic``; see ``esh/bench/elastic_compute.py``.
"""

from esh.bench.elastic_compute import main

if __name__ == "__main__":
    main()
