"""Regenerate the README's performance section from ``benchmarks/results``: ``python benchmarks/report.py``."""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from jacfast.bench.report import update_readme  # noqa: E402

update_readme(os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "results"))
print("README.md performance section updated")
