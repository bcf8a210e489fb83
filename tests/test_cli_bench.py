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


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """One smoke run of every benchmark, shared by the tests below (one thread: on a loaded
    2-core machine OpenMP barrier stalls make tiny ops 100x slower)."""
    out = tmp_path_factory.mktemp("bench")
    result = run_cli("bench", "--suite", "smoke", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_bench_smoke_writes_results_and_report(smoke_results, tmp_path):
    import shutil

    (src,) = smoke_results.glob("loss_head-smoke-*.json")
    path = tmp_path / src.name
    shutil.copy(src, path)
    data = json.loads(path.read_text())
    assert data["environment"]["device"] and data["environment"]["torch"]
    providers = {row["provider"] for row in data["rows"]}
    assert {"eager", "compile", "public", "jacfast-cpu"} <= providers
    assert all(row["median_ms"] > 0 and row["max_rel_err"] < 1e-4 for row in data["rows"])
    assert {row["mode"] for row in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    assert all(row["peak_mb"] >= 0 for row in data["rows"])

    from jacfast.bench import report

    data["suite"] = "quick"  # the report shows quick/full suites
    path.write_text(json.dumps(data))
    section = report.performance_section(str(tmp_path))
    assert data["environment"]["device"] in section and "| normalized | float32 | 8 | 50 | cpu |" in section
    fwd, bwd = ({(r["kind"], r["rows"], r["dim"]): r["median_ms"] for r in data["rows"]
                 if r["provider"] == "jacfast-cpu" and r["dtype"] == "float32" and r["mode"] == m}
                for m in ("fwd", "bwd"))
    (line,) = [x for x in section.splitlines()  # the fwd-alone and bwd-alone table's row
               if x.startswith(f"| normalized | 2 | 1000 | cpu | {fwd['normalized', 2, 1000]:.3f} |")]
    assert line.split(" | ")[7] == f"{bwd['normalized', 2, 1000]:.3f}"
    pytest.importorskip("matplotlib")
    written = {os.path.basename(p) for p in report.plot(str(tmp_path))}
    linked = {part.split("(")[-1].rstrip(")") for part in section.split() if part.endswith(".png)")}
    assert linked and {os.path.basename(p) for p in linked} <= written  # the generated plot links resolve


def test_bench_smoke_selection_and_training_step(smoke_results, tmp_path):
    from jacfast.bench import report, sequence_step, training_step
    from jacfast.jacobians import STRATEGIES

    (sel_path,) = smoke_results.glob("selection-smoke-*.json")
    (step_path,) = smoke_results.glob("training_step-smoke-*.json")
    sel, step = json.loads(sel_path.read_text()), json.loads(step_path.read_text())
    assert sel["benchmark"] == "selection" and step["benchmark"] == "training_step"
    assert sel["environment"]["device"] and step["environment"]["torch"]

    topk = [r for r in sel["rows"] if r["op"] == "topk_seeds"]
    assert {"jacfast-torch", "torch.topk+scatter"} <= {r["provider"] for r in topk}
    assert all(r["median_ms"] > 0 and r["matches_naive"] for r in topk)
    strategies = [r for r in sel["rows"] if r["op"] == "input_jacobians"]
    for create_graph in (False, True):
        group = {r["strategy"]: r for r in strategies if r["create_graph"] is create_graph}
        assert set(group) == {*STRATEGIES, "auto"}
        auto = group["auto"]
        assert auto["median_ms"] > 0 and auto["auto_first_call_ms"] > 0 and auto["auto_choice"] in STRATEGIES
        assert auto["vs_best_fixed"] > 0 and auto["best_fixed"] in STRATEGIES

    rows = step["rows"]
    cnn = [r for r in rows if r["op"] == "training_step"]  # then the transformer's (sequence_step)
    assert [r["provider"] for r in cnn] == list(training_step.PROVIDERS) * len({r["k"] for r in cnn})
    assert [r["provider"] for r in rows if r["op"] == "sequence_step"] == list(sequence_step.PROVIDERS)
    assert all(r["median_ms"] > 0 and r["peak_mb"] > 0 for r in rows)
    for r in rows:  # the bootstrap interval brackets the paired ratio it is an interval of
        lo, hi = r["speedup_vs_naive_paired_ci95"]
        assert lo <= r["speedup_vs_naive_paired"] <= hi
    assert step["environment"]["allocator"].startswith("glibc")  # the default: --allocator keep
    # Same weights, same batch: every Jacobian-matching provider computes the naive loop's loss.
    assert all(r["loss_rel_diff_vs_naive"] < 1e-4 for r in rows if r["provider"] not in training_step.OTHER_LOSS)

    for path, data in ((sel_path, sel), (step_path, step)):
        data["suite"] = "quick"  # the report shows quick/full suites
        (tmp_path / path.name).write_text(json.dumps(data))
    section = report.performance_section(str(tmp_path))
    assert "### Input-Jacobian selection on" in section and "### Distillation training step on" in section
    assert "| torch.topk+scatter |" in section and "| jacfast-cache |" in section
    pytest.importorskip("matplotlib")
    assert any("training_step-memory-" in p for p in report.plot(str(tmp_path)))


def test_paired_ratio_interval():
    from jacfast.bench.timing import paired_ratio, paired_ratio_interval

    raw = {"a": [2.0, 2.2, 1.9, 2.1, 2.0, 2.4, 2.0, 1.8], "b": [1.0, 1.0, 1.0, 1.1, 0.9, 1.2, 1.0, 1.0]}
    lo, hi = paired_ratio_interval(raw, "a", "b")
    assert lo <= paired_ratio(raw, "a", "b") <= hi and 1.5 < lo and hi < 2.5
    assert (lo, hi) == paired_ratio_interval(raw, "a", "b")  # fixed seed: reproducible
    assert paired_ratio_interval({"a": [1.0] * 5, "b": [1.0] * 5}, "a", "b") == (1.0, 1.0)


def test_rotation_exceeds_twice_the_last_level_cache(tmp_path, monkeypatch):
    """Inputs rotate through at least twice the largest cache sysfs reports (a 105 MiB L3 needs
    more than the fixed 128 MiB), at least 128 MiB, at most 32 sets."""
    import torch

    from jacfast.bench import timing

    for index, size in enumerate(("48K", "2048K", "107520K")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert timing.last_level_cache_bytes(str(tmp_path)) == 105 * 2**20
    assert timing.last_level_cache_bytes(str(tmp_path / "missing")) is None
    cpu = torch.device("cpu")
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 105 * 2**20)
    assert timing.rotation_count(7 * 2**20, cpu) == 30  # ceil(210 / 7)
    assert timing.rotation_count(2**20, cpu) == 32 and timing.rotation_count(2**30, cpu) == 1
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: None)
    assert timing.rotation_count(8 * 2**20, cpu) == 16  # 128 MiB


def test_measure_blocks_times_every_provider_in_turns():
    import torch

    from jacfast.bench.timing import measure_blocks

    log = []
    fns = {name: (lambda arg, _n=name: log.append((_n, arg))) for name in ("a", "b", "c")}
    setups = {"b": lambda i: ("prepared", i)}
    timings = measure_blocks(fns, torch.device("cpu"), rounds=3, min_time=0.0, min_repeats=6, warmup=1,
                             setups=setups)
    assert all(t.repeats == 6 and t.median >= 0 for t in timings.values())  # 3 rounds x 2 timed calls
    assert [arg for name, arg in log if name == "b"] == [("prepared", i) for i in range(1 + 3 * 3)]
    order = [name for name, _ in log[3:]]  # after the warm-up: blocks of 3 calls (1 untimed + 2)
    blocks = [order[i] for i in range(0, len(order), 3)]
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # the order rotates each round


def test_time_budget_spent_before_a_benchmark_starts_skips_it(tmp_path):
    result = run_cli("bench", "--suite", "smoke", "--threads", "1", "--only", "training_step", "selection",
                     "--time-budget", "1e-9", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    # --only runs in the order given; neither starts, and no file claims to be a result.
    out = result.stdout
    assert 0 <= out.index("training_step: not started") < out.index("selection: not started")
    assert list(tmp_path.glob("*.json")) == []
    bad = run_cli("bench", "--suite", "smoke", "--time-budget", "0", "--out", str(tmp_path))
    assert bad.returncode != 0 and "--time-budget" in bad.stderr


class _BudgetAfter:
    """A TimeBudget that expires at its (n + 1)-th check."""

    def __init__(self, n: int):
        from jacfast.bench.timing import TimeBudget

        self.budget, self.left = TimeBudget(None), n

    def expired(self) -> bool:
        self.left -= 1
        self.budget.skipped = self.budget.skipped or self.left < 0
        return self.budget.skipped


def test_benchmarks_stop_at_their_budget_between_configurations():
    import torch

    from jacfast.bench import loss_head, selection

    cpu = torch.device("cpu")
    budget = _BudgetAfter(1)
    rows = loss_head.run([(4, 8), (2, 16), (3, 5)], cpu, progress=None, budget=budget)
    assert {(r["rows"], r["dim"]) for r in rows} == {(4, 8)} and budget.budget.skipped  # one size, then stop
    rows = selection.run("smoke", cpu, budget=_BudgetAfter(1))
    assert [r["op"] for r in rows] == ["topk_seeds"] * len(rows) and len({r["k"] for r in rows}) == 1
    complete = _BudgetAfter(10)
    assert len(loss_head.run([(4, 8)], cpu, budget=complete)) > 0 and not complete.budget.skipped


def test_result_file_is_readable_while_the_run_goes_on(tmp_path):
    from jacfast.cli.bench import ResultFile

    env = {"device": "Some GPU (x)", "timestamp": "2026-12-01T00:00:00+00:00"}
    result = ResultFile(str(tmp_path), "loss_head", "full", env, every=0.0)
    result.add({"a": 1})
    partial = json.loads(open(result.path).read())  # a kill now leaves this
    assert partial["rows"] == [{"a": 1}] and partial["complete"] is False
    result.add({"a": 2})
    assert result.finish() == result.path
    done = json.loads(open(result.path).read())
    assert done["rows"] == [{"a": 1}, {"a": 2}] and done["complete"] is True and done["stopped"] is None
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(result.path)]  # no .tmp left behind


def test_time_budget_expires():
    import time

    from jacfast.bench.timing import TimeBudget

    assert not TimeBudget(None).expired() and not TimeBudget(60).expired()
    budget = TimeBudget(0.01)
    time.sleep(0.02)
    assert budget.expired() and budget.skipped
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="time budget"):
            TimeBudget(bad)


def _loss_head_result(device_type: str, timestamp: str, *, complete=True, rows=((4096, 4096, 1.1),)) -> dict:
    """A loss-head result file's content: one jacfast row per (R, D, x floor), fwd+bwd."""
    device = "Some GPU" if device_type == "cuda" else "Some CPU"
    out = []
    for r, d, vs_floor in rows:
        base = {"op": "loss_head", "kind": "normalized", "dtype": "float32", "mode": "fwd+bwd", "rows": r, "dim": d,
                "median_ms": 1.0, "gbps": 100.0, "vs_floor": vs_floor, "speedup_vs_eager": 7.0,
                "speedup_vs_compile": 2.0, "speedup_vs_best_other": 2.0, "peak_mb": 1.0}
        out += [{**base, "provider": "jacfast-cuda"}, {**base, "provider": "eager", "vs_floor": 7.7}]
    return {"benchmark": "loss_head", "suite": "full", "complete": complete,
            "stopped": None if complete else "time budget of 100 s reached",
            "environment": {"device": device, "device_type": device_type, "torch": "2.11", "triton": "3.6",
                            "python": "3.12", "git_revision": "abc", "timestamp": timestamp}, "rows": out}


def test_report_prefers_complete_runs_and_labels_incomplete_ones(tmp_path):
    from jacfast.bench import report

    def write(name, data):
        (tmp_path / name).write_text(json.dumps(data))

    write("a.json", _loss_head_result("cuda", "2026-12-01T10:00:00+00:00", complete=False))
    section = report.performance_section(str(tmp_path))
    assert "**Incomplete run** (time budget of 100 s reached)" in section  # the only GPU run: shown, labelled
    write("b.json", _loss_head_result("cuda", "2026-12-01T09:00:00+00:00", rows=((4096, 4096, 1.25),)))
    section = report.performance_section(str(tmp_path))
    assert "Incomplete" not in section and "/b.json)" in section  # an older complete run wins
    # GPU targets: the bandwidth column counts R * D >= 1e7 only (1 / 1.25 = 80 %).
    assert "GPU targets" in section and "| normalized | float32 | cuda | 1 | 7.0 | 2.00 | 80 |" in section
    write("c.json", {**_loss_head_result("cuda", "2026-12-01T11:00:00+00:00"), "rows": [
        {**row, "mode": "fwd"} for row in _loss_head_result("cuda", "x")["rows"]]})
    assert "/b.json)" in report.performance_section(str(tmp_path))  # a newer run without fwd+bwd rows: skipped


def test_report_names_the_gpu_kernels_of_each_row(tmp_path):
    """CUDA and Triton rows say which forward_backward kernels ran (fused rows, fused split rows
    or two passes)."""
    from jacfast.bench import report

    data = _loss_head_result("cuda", "2026-12-01T10:00:00+00:00")
    data["rows"][0]["kernel_path"] = "fused split rows"
    data["rows"].append({**data["rows"][0], "provider": "jacfast-cuda-unfused", "median_ms": 2.0,
                         "speedup_vs_eager": 3.5, "kernel_path": "forward then backward"})
    (tmp_path / "a.json").write_text(json.dumps(data))
    section = report.performance_section(str(tmp_path))
    assert "| normalized | float32 | 4096 | 4096 | cuda (fused split rows) | 1.000 |" in section
    # the unfused comparison is in the table, not among the targets' worst cases
    assert "| normalized | float32 | 4096 | 4096 | cuda-unfused (forward then backward) | 2.000 |" in section
    assert "| normalized | float32 | cuda | 1 | 7.0 |" in section and "| cuda-unfused | 1 |" not in section


def test_bench_names_the_triton_kernels(monkeypatch):
    """The loss-head bench records which kernels Triton's forward_backward runs (the path the
    kernel module reports, in the CUDA backend's words)."""
    import importlib

    import torch

    from jacfast import registry
    from jacfast.bench import loss_head

    if not registry.status_for("triton", "cpu").available:
        pytest.skip("no Triton interpreter here")
    cpu = torch.device("cpu")
    assert loss_head._kernel_path("triton", 2, 3072, torch.float32, "normalized", cpu) == "fused split rows"
    assert loss_head._kernel_path("triton", 64, 3072, torch.float32, "normalized", cpu) == "fused rows"
    monkeypatch.setattr(importlib.import_module("jacfast.kernels.triton_jacobian_matching.fused"), "FUSE_SPLIT_ROWS",
                        False)
    assert loss_head._kernel_path("triton", 2, 3072, torch.float32, "normalized", cpu) == "forward then backward"


def test_unfused_provider_runs_forward_then_backward():
    """The GPU bench's jacfast-<backend>-unfused (here on the CPU backend): forward, then
    backward, never forward_backward, with the fused path's loss and gradient bits."""
    import torch
    from torch.profiler import profile

    import jacfast
    from jacfast.bench import loss_head

    student, teacher = torch.randn(6, 2, 301), torch.randn(6, 2, 301)
    for kind in ("normalized", "squared", "norm"):
        t = None if kind == "norm" else teacher
        a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        fused = jacfast.jacobian_matching_loss(a, t, kind=kind, backend="cpu")
        (fused_grad,) = torch.autograd.grad(fused, a)
        with profile() as prof:
            unfused = loss_head._unfused("cpu", kind)(b, t)
            (unfused_grad,) = torch.autograd.grad(unfused, b)
        ran = {event.name for event in prof.events() if event.name.startswith("jacfast_cpu::")}
        assert ran == {"jacfast_cpu::forward", "jacfast_cpu::backward"}, (kind, ran)
        assert torch.equal(fused, unfused) and torch.equal(fused_grad, unfused_grad), kind
