"""The training-step benchmark's transformer rows (jacfast.bench.sequence_step) at smoke size."""
import torch

from jacfast.bench import sequence_step


def test_sequence_step_smoke_rows_agree_with_the_naive_loop():
    rows = sequence_step.run("smoke", torch.device("cpu"))
    assert [r["provider"] for r in rows] == list(sequence_step.PROVIDERS)
    for r in rows:
        assert r["op"] == "sequence_step" and r["k"] == r["positions"] * r["k_per_position"] == 2
        assert r["median_ms"] > 0 and r["peak_mb"] is not None and r["peak_mb"] > 0
        if r["provider"] != "kd-floor":  # the same first step: the same loss, every estimator's value is exact
            assert r["loss_rel_diff_vs_naive"] < 1e-6, r
    assert {r["student_attention"] for r in rows if r["provider"].startswith("jacfast-fd")} == {"sdpa"}
