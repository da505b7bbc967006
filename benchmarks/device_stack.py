"""End-to-end figures on a GPU: vision inference/training img/s, ESH LM tokens/s and decode
ms/token, esh_medium's training-step peak memory (see esh.bench.device_stack)."""

from esh.bench.device_stack import main

if __name__ == "__main__":
    main()
