"""Vision throughput: ``python benchmarks/vision_throughput.py [--batches 8] [--models ...]``.

The same as ``esh bench vision``; see ``esh/bench/vision_throughput.py``.
"""

from esh.bench.vision_throughput import main

if __name__ == "__main__":
    main()
