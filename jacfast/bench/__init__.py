"""Benchmarks of jacfast's kernels against eager autograd, torch.compile and a memory-pass floor.

``python -m jacfast bench`` runs them; results are JSON rows (device, versions, revision)
under ``benchmarks/results/``; ``benchmarks/plot.py`` and ``benchmarks/report.py`` turn
those files into plots, docs/performance.md's tables and the README's summary.
"""
