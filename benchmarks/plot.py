"""Plots from benchmark result files: ``python benchmarks/plot.py [RESULTS_DIR]``."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jacfast.bench.report import plot  # noqa: E402

folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
for path in plot(folder):
    print("wrote", path)
