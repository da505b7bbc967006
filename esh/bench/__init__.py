"""Measurement helpers behind ``esh bench`` and the scripts in ``benchmarks/``, one module per
benchmark. Importing them changes nothing in the process: ``esh bench`` and the scripts call
:func:`esh.runtime.tune_cpu_allocator` when they start, so the figures are those a user of the
``esh`` command gets.
"""
