"""Smoke runs of the benchmark and check commands, and of the report generated from their files."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jacfast", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("bench", "check", "distill", "transfer", "robustness"):
        assert command in result.stdout


def test_check_verifies_available_backends():
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch" in result.stdout and "FAIL" not in result.stdout


def test_bench_smoke_writes_results_and_report(tmp_path):
    result = run_cli("bench", "--suite", "smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = tmp_path.glob("loss_head-smoke-*.json")
    data = json.loads(path.read_text())
    assert data["environment"]["device"] and data["environment"]["torch"]
    providers = {row["provider"] for row in data["rows"]}
    assert {"eager", "compile", "public", "jacfast-cpu"} <= providers
    assert all(row["median_ms"] > 0 and row["max_rel_err"] < 1e-4 for row in data["rows"])

    from jacfast.bench import report

    data["suite"] = "quick"  # the report shows quick/full suites
    path.write_text(json.dumps(data))
    section = report.performance_section(str(tmp_path))
    assert data["environment"]["device"] in section and "| normalized | float32 | 8 | 50 | cpu |" in section
    pytest.importorskip("matplotlib")
    assert report.plot(str(tmp_path))
