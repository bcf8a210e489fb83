"""Command line: ``python -m jacfast {bench,check,distill,prop1,transfer,robustness,text}``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jacfast" if os.path.basename(sys.argv[0]) == "__main__.py" else "jacfast",
        description="Jacobian-matching knowledge transfer (Srinivas & Fleuret, ICML 2018): fused losses, "
        "benchmarks and the paper's experiments.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in ("bench", "check", "train", "text"):
        importlib.import_module(f"jacfast.cli.{module}").register(subparsers)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)
