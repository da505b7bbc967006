"""Training throughput: ``python benchmarks/train_throughput.py [--batch-size 16]``.

See ``esh/bench/train_throughput.py``.
"""

from esh.bench.train_throughput import main

if __name__ == "__main__":
    main()
