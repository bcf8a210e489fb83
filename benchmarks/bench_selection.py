"""One benchmark on its own: ``python benchmarks/bench_selection.py [--suite quick|full|smoke] [--device cpu|cuda]
[--threads N] [--out DIR] ...``, the same as ``python -m jacfast bench --only selection ...``."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jacfast.cli import main  # noqa: E402

sys.exit(main(["bench", "--only", "selection", *sys.argv[1:]]))
