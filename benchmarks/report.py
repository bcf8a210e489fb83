"""Regenerate the plots and the README's performance section from ``benchmarks/results``:
``python benchmarks/report.py`` (the plots alone: ``benchmarks/plot.py``)."""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from jacfast.bench.report import plot, update_readme  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
for path in plot(RESULTS):  # the README links them
    print("wrote", os.path.relpath(path, ROOT))
update_readme(os.path.join(ROOT, "README.md"), RESULTS)
print("README.md performance section updated")
