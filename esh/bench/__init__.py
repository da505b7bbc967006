"""Measurement helpers behind ``esh bench`` and the scripts in ``benchmarks/``."""
