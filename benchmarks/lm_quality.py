"""ESH LM vs GPT vs pure Mamba, char-level, equal parameters and tokens:
``python benchmarks/lm_quality.py [--models esh gpt mamba] [--seeds 1337 ...] [--out results.jsonl]``.

See ``esh/bench/lm_quality.py``.
"""

from esh.bench.lm_quality import main

if __name__ == "__main__":
    main()
