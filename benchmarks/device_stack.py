"""End-to-end figures on a GPU: vision inference/training img/s, ESH LM tokens/s and decode
ms/token, esh_medium's training-step peak memory (see esh.bench.device_stack)."""

from esh.bench.device_stack import main
from esh.runtime import tune_cpu_allocator

if __name__ == "__main__":
    tune_cpu_allocator()  # the allocator settings the esh command runs with (esh.runtime)
    main()
