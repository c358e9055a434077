"""Experiments and profilers: one-off measurements behind past decisions, kept runnable.

What users run (training the prior, evaluation, the benchmarks of record) is in ``scripts/``.
"""
