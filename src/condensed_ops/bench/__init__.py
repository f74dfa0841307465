"""Benchmarks: ``python -m condensed_ops.bench``."""
