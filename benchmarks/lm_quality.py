"""ESH LM vs GPT vs pure Mamba, char-level, equal parameters and tokens:
``python benchmarks/lm_quality.py [--models esh gpt mamba] [--seeds 1337 ...] [--out results.jsonl]``.

See ``esh/bench/lm_quality.py``.
"""

from esh.bench.lm_quality import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
