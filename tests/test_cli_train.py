"""``python -m jacfast {distill,prop1,robustness,transfer}`` on tiny settings and synthetic data (seconds),
and the experiment pieces that carry the conclusions (paired statistics, Proposition 1's sides)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from jacfast.cli import main
from helpers import make_fashion_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --tiny sets one thread


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return make_fashion_dir(str(tmp_path_factory.mktemp("data") / "fashion"), per_class=(25, 4))


def _check_outputs(out, command, rows, plots=None):
    res = json.loads((out / "results.json").read_text())
    for stem in plots or [command]:
        assert (out / f"{stem}.png").stat().st_size > 1000, stem
    table = (out / "results.md").read_text()
    assert all(f"| {r} |" in table for r in rows), table
    assert len(res["git"]["commit"]) == 40 and isinstance(res["git"]["dirty"], bool)
    assert res["command"].startswith("python -m jacfast") and res["settings"]["tiny"] is True
    return res, table


def test_distill_tiny(tmp_path, fashion):
    from jacfast.experiments.distill import METHODS, RQ5_METHODS

    out = tmp_path / "distill"
    assert main(["distill", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress"]) == 0
    rq5 = [m for m in RQ5_METHODS if m not in METHODS]
    res, table = _check_outputs(out, "distill", list(METHODS) + rq5, plots=["distill", "rq5_cost"])
    assert len(res["runs"]) == (len(METHODS) * 2 + len(rq5)) * 2  # n in {1, 2}, RQ5 at n = 2, 2 seeds
    assert {s["n_seeds"] for s in res["summary"]} == {2}
    # paired against kd: every other method at every n it ran, over both seeds
    pairs = {(p["method"], p["n"]): p for p in res["paired_vs_kd"]}
    assert set(pairs) == {(r["method"], r["n"]) for r in res["runs"]} - {("kd", 1), ("kd", 2)}
    assert all(p["pairs"] == 2 and len(p["ci95"]) == 2 for p in pairs.values())
    assert "Paired differences against kd" in table
    # RQ5: one row per selection (and kd), each with its accuracy and measured time per step
    rq5_rows = {r["method"]: r for r in res["rq5"]}
    assert set(rq5_rows) == {"kd", *RQ5_METHODS}
    assert all(r["s_per_step_live"] > 0 and r["acc_mean"] is not None for r in rq5_rows.values())
    assert rq5_rows["kd+jac-sq-proj1"]["s_per_step_cached"] is None  # random directions: no cache
    assert rq5_rows["kd+jac-sq-all"]["s_per_step_cached"] > 0
    assert (out / "teacher.pt").exists()
    # a second invocation reuses the teacher and every finished run
    mtime = (out / "runs" / "kd_n1_s0" / "result.json").stat().st_mtime_ns
    assert main(["distill", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress",
                 "--methods", "kd", "--rq5-methods"]) == 0
    assert (out / "runs" / "kd_n1_s0" / "result.json").stat().st_mtime_ns == mtime


def test_each_distill_method_builds_its_own_loss():
    """Method names map to distinct losses (a prefix match once ran kd+jac-sq for kd+jac-sq-noise)."""
    from types import SimpleNamespace

    from jacfast.experiments.distill import (ALL_METHODS, ProjectedJacobianDistillation, SquaredErrorDistillation,
                                             make_loss)

    args = SimpleNamespace(beta_norm=1.0, beta_sq=0.1, noise_sigma=0.1)
    teacher = torch.nn.Linear(4, 3)
    expected = {  # (kd weight, beta, kind, estimator, select, k, cache)
        "ce": (0.0, 0.0, "normalized", "exact", "topk", 1, ("topk", 1)),
        "kd": (1.0, 0.0, "normalized", "exact", "topk", 1, ("topk", 1)),
        "kd+jac-norm": (1.0, 1.0, "normalized", "exact", "topk", 1, ("topk", 1)),
        "kd+jac-norm-fd": (1.0, 1.0, "normalized", "finite_difference", "topk", 1, ("topk", 1)),
        "kd+jac-sq": (1.0, 0.1, "squared", "exact", "topk", 1, ("topk", 1)),
        "kd+jac-sq-fd": (1.0, 0.1, "squared", "finite_difference", "topk", 1, ("topk", 1)),
        "kd+jac-sq-target": (1.0, 0.1, "squared", "exact", "target", 1, ("target", 1)),
        "kd+jac-sq-top5": (1.0, 0.1, "squared", "exact", "topk", 5, ("topk", 5)),
        "kd+jac-sq-all": (1.0, 0.1, "squared", "exact", "all", 1, ("all", 1)),
        "kd+jac-sq-noise": (1.0, 0.1, "squared", "noise", "topk", 1, None),
    }
    others = {"kd+jac-sq-proj1", "kd+jac-sq-proj4", "sq", "sq-noise", "sq+jac"}
    assert set(expected) | others == set(ALL_METHODS)
    for method, (kd_weight, beta, kind, estimator, sel, k, cache) in expected.items():
        loss, got_cache = make_loss(method, teacher, args)
        assert (loss.kd_weight, loss.beta, loss.kind, loss.estimator, loss.select, loss.k, got_cache) == \
            (kd_weight, beta, kind, estimator, sel, k, cache), method
    for k in (1, 4):
        loss, cache = make_loss(f"kd+jac-sq-proj{k}", teacher, args)
        assert isinstance(loss, ProjectedJacobianDistillation) and (loss.k, loss.beta, cache) == (k, 0.1, None)
    # Proposition 1's sides: no reweighting, beta = sigma^2 on the Jacobian side
    for method, sigma, weight, cache in (("sq", 0.0, 0.0, ("topk", 1)), ("sq-noise", 0.2, 0.0, None),
                                         ("sq+jac", 0.0, 0.2 ** 2, ("all", 1))):
        loss, got = make_loss(method, teacher, args, sigma=0.2)
        assert isinstance(loss, SquaredErrorDistillation), method
        assert (loss.noise_sigma, got) == (sigma, cache) and loss.jacobian_weight == pytest.approx(weight), method
        assert loss.projections is None
    loss, cache = make_loss("sq+jac", teacher, SimpleNamespace(noise_sigma=0.1, jacobian_projections=2))
    assert (loss.projections, cache, loss.jacobian_weight) == (2, None, pytest.approx(0.01))
    with pytest.raises(ValueError, match="unknown distillation method"):
        make_loss("kd+jac", teacher, args)


def _f64_pair():
    torch.manual_seed(0)
    t = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    s = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    return t, s, torch.randn(6, 5, dtype=torch.float64)


def _full_jacobian(f, x):
    return torch.stack([torch.autograd.functional.jacobian(lambda z: f(z[None])[0], xi) for xi in x])  # (B, C, D)


def test_squared_error_distillation_against_autograd():
    """sq+jac = CE + ||S - T||^2 + w ||J_S - J_T||_F^2 with full Jacobians (float64, by hand); sq-noise uses noisy inputs."""
    from jacfast.experiments.distill import SquaredErrorDistillation

    t, s, x = _f64_pair()
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    total, comps = SquaredErrorDistillation(t, jacobian_weight=0.3)(s, x, y)
    ce = torch.nn.functional.cross_entropy(s(x), y)
    sq = (s(x) - t(x)).pow(2).sum(1).mean()
    jac = (_full_jacobian(s, x) - _full_jacobian(t, x)).pow(2).sum((1, 2)).mean()
    torch.testing.assert_close(comps["jacobian"], jac)
    torch.testing.assert_close(total, ce + sq + 0.3 * jac)
    g = torch.autograd.grad(total, list(s.parameters()))
    jac_ref = (torch.func.vmap(torch.func.jacrev(lambda z: s(z[None])[0]))(x) - _full_jacobian(t, x)).pow(2).sum((1, 2)).mean()
    g_ref = torch.autograd.grad(ce + sq + 0.3 * jac_ref, list(s.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    torch.manual_seed(4)
    total, comps = SquaredErrorDistillation(t, jacobian_weight=0.3, projections=3)(s, x, y)
    torch.manual_seed(4)
    v = torch.randint(0, 2, (3, 6, 3)).double() * 2 - 1  # the loss's draw, replayed
    dj = _full_jacobian(s, x) - _full_jacobian(t, x)
    torch.testing.assert_close(comps["jacobian"], torch.einsum("kbc,bcd->bkd", v, dj).pow(2).sum((1, 2)).mean() / 3)
    torch.testing.assert_close(total, ce + sq + 0.3 * comps["jacobian"])
    torch.manual_seed(3)
    total, comps = SquaredErrorDistillation(t, noise_sigma=0.5)(s, x, y)
    torch.manual_seed(3)
    xn = x + 0.5 * torch.randn_like(x)
    torch.testing.assert_close(comps["sq"], (s(xn) - t(xn)).pow(2).sum(1).mean())
    torch.testing.assert_close(total, ce + comps["sq"])
    with pytest.raises(ValueError, match="noise_sigma"):
        SquaredErrorDistillation(t, noise_sigma=-1.0)
    with pytest.raises(ValueError, match="projections"):
        SquaredErrorDistillation(t, projections=0)


def test_projected_jacobian_distillation_matches_its_definition():
    from jacfast.experiments.distill import ProjectedJacobianDistillation

    t, s, x = _f64_pair()
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    torch.manual_seed(5)
    out = ProjectedJacobianDistillation(t, 4, beta=0.7)(s, x, y)
    torch.manual_seed(5)
    t(x[:1])
    v = torch.randint(0, 2, (4, 6, 3)).double() * 2 - 1  # the loss's draw, replayed
    dj = _full_jacobian(s, x) - _full_jacobian(t, x)  # (B, C, D)
    ref = torch.einsum("kbc,bcd->bkd", v, dj).pow(2).sum((1, 2)).mean() / 4
    torch.testing.assert_close(out.jacobian, ref)
    assert all(abs(e) == 1 for e in v.flatten().tolist())


def test_monte_carlo_sides_agree_for_affine_networks_and_differ_for_curved_ones():
    """Proposition 1 is exact for affine f_s, f_t: LHS = RHS up to Monte-Carlo error only."""
    from jacfast.experiments.prop1 import monte_carlo

    torch.manual_seed(0)
    t, s = torch.nn.Linear(5, 3).double(), torch.nn.Linear(5, 3).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    res = monte_carlo(t, s, x, [0.1, 1.0], pairs=400)
    for sigma, (lhs, rhs) in res.items():
        frob = (s.weight - t.weight).pow(2).sum()
        torch.testing.assert_close(rhs, (sigma ** 2 * frob).expand(40))
        # antithetic pairs: lhs = mean of ||A e||^2 over 800 draws, relative error ~ sqrt(2/800 / 3)
        assert abs(float(lhs.mean() / rhs.mean()) - 1) < 0.05, sigma
    t2, s2, _ = _f64_pair()
    lhs, rhs = monte_carlo(t2, s2, x, [3.0], pairs=200)[3.0]
    assert abs(float(lhs.mean() / rhs.mean()) - 1) > 0.1  # far from first order at sigma = 3


def test_paired_statistics_against_hand_computation():
    from jacfast.experiments import stats

    vals = {"kd": {0: 0.50, 1: 0.60, 2: 0.55}, "a": {0: 0.52, 1: 0.61, 2: 0.59, 3: 0.9}, "b": {5: 1.0}}
    p = stats.paired(vals, "kd")
    assert set(p) == {"a"}  # b shares no unit with kd; unit 3 of a is not paired
    d = [0.02, 0.01, 0.04]
    m = sum(d) / 3
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / 2)
    h = 4.303 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert p["a"]["mean"] == pytest.approx(m) and p["a"]["ci95"] == pytest.approx([m - h, m + h])
    assert p["a"]["pairs"] == 3 and p["a"]["wins"] == 3 and not stats.significant(p["a"])  # CI [-0.015, 0.061]
    assert stats.significant(stats.mean_ci([0.02, 0.021, 0.019])) and stats.significant(stats.mean_ci([-0.02, -0.021]))
    assert stats.t975(4) == 2.776 and stats.t975(100) == 1.96
    one = stats.mean_ci([0.3])
    assert math.isnan(one["se"]) and not stats.significant(one)
    with pytest.raises(ValueError, match="baseline"):
        stats.paired(vals, "none")


def test_prop1_tiny(tmp_path, fashion):
    out = tmp_path / "prop1"
    assert main(["prop1", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress"]) == 0
    res, table = _check_outputs(out, "prop1", [], plots=["prop1_training", "prop1_monte_carlo"])
    assert len(res["runs"]) == (2 * 3 + 1) * 2  # (sq-noise, sq+jac) x 3 sigmas + sq, 2 seeds
    assert [r["sigma"] for r in res["training"]] == [0.05, 0.1, 0.2]
    for r in res["monte_carlo"]:
        assert r["units"] == 2 * 20 and r["rhs_mean"] > 0 and math.isfinite(r["lhs_mean"])
        assert len(r["lhs_minus_rhs"]["ci95"]) == 2
    assert "Monte-Carlo check" in table and "sq-noise - sq+jac" in table


def test_robustness_tiny(tmp_path, fashion):
    out = tmp_path / "rob"
    assert main(["robustness", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress",
                 "--seeds", "0", "1"]) == 0
    res, table = _check_outputs(out, "robustness", ["none", "jacobian", "l2", "dropout"])
    assert {r["sigma"] for r in res["summary"]} == {0.0, 0.1, 0.2, 0.3, 0.5}
    assert len(res["runs"]) == 8
    assert {(p["method"], p["sigma"]) for p in res["paired_vs_none"]} == \
        {(m, s) for m in ("jacobian", "l2", "dropout") for s in (0.0, 0.1, 0.2, 0.3, 0.5)}


def test_transfer_tiny(tmp_path, fashion):
    out = tmp_path / "transfer"
    assert main(["transfer", "--tiny", "--out", str(out), "--fashion-dir", fashion, "--no-progress"]) == 0
    res, table = _check_outputs(out, "transfer", ["probe", "scratch", "lwf@block1", "at@block3", "at+jac@block1",
                                                  "at+jac@block3"])
    assert len(res["runs"]) == 8 * 2 * 2  # probe + 7 rows, n in {1, 2}, 2 seeds
    assert res["source_classes"] == [0, 1, 2, 3, 4] and res["target_classes"] == [5, 6, 7, 8, 9]
    assert {(p["method"], p["n"]) for p in res["paired_vs_scratch"]} >= {("probe", 1), ("at+jac@block3", 2)}
    teacher = torch.load(out / "teacher.pt", weights_only=False)
    assert teacher["spec"]["num_classes"] == 5  # trained on the source classes only
    with pytest.raises(SystemExit, match="overlap"):
        main(["transfer", "--tiny", "--out", str(tmp_path / "t2"), "--fashion-dir", fashion, "--no-progress",
              "--target-classes", "4", "5"])


def test_split_classes_renumbers_in_order():
    from jacfast.experiments.transfer import split_classes

    x = torch.arange(8.0)[:, None]
    y = torch.tensor([5, 1, 7, 5, 0, 7, 9, 1])
    xs, ys = split_classes(x, y, [7, 5])
    assert xs.flatten().tolist() == [0.0, 2.0, 3.0, 5.0] and ys.tolist() == [1, 0, 1, 0]


def test_changed_settings_in_same_out_are_refused(tmp_path, fashion):
    args = ["robustness", "--tiny", "--out", str(tmp_path), "--fashion-dir", fashion, "--no-progress",
            "--seeds", "0", "--methods", "l2"]
    assert main(args) == 0
    os.remove(tmp_path / "runs" / "l2_s0" / "result.json")  # as if it had been interrupted
    with pytest.raises(SystemExit, match="different model/config"):
        main(args[:-1] + ["l2", "--weight-decay", "0.1"])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        main(["robustness", "--tiny", "--out", str(tmp_path), "--fashion-dir", str(tmp_path / "none")])


@pytest.mark.parametrize("command", ["distill", "prop1", "robustness", "transfer"])
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
