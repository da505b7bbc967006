"""Measurement helpers behind ``esh bench`` and the scripts in ``benchmarks/``.

Importing this package tunes glibc's allocator for eager PyTorch (:mod:`esh.runtime`), as
the ``esh`` command does: benchmark figures are those a user of the command gets.
"""

from esh.runtime import tune_cpu_allocator

tune_cpu_allocator()
