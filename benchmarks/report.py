"""Regenerate the plots, docs/performance.md's tables and the README's performance summary from
``benchmarks/results``: ``python benchmarks/report.py`` (``make docs``; the plots alone:
``benchmarks/plot.py``)."""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from jacfast.bench.report import plot, update_docs  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
for path in plot(RESULTS):  # the documents link them
    print("wrote", os.path.relpath(path, ROOT))
update_docs(os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "performance.md"), RESULTS)
print("README.md performance summary and docs/performance.md tables updated")
