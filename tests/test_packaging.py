"""Packaging: the version written once, the dev extra equal to requirements-dev.txt, the console
script, and (run by `make install-check` against a copy installed with pip) the installed
package loading its own compiled extension."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by `make install-check`: the tests below must then run against the installed copy.
EXPECT_INSTALLED = os.environ.get("JACFAST_EXPECT_INSTALLED") == "1"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def test_version_is_written_once():
    import jacfast
    from jacfast import version

    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jacfast.version.__version__"}
    assert jacfast.__version__ == version.__version__ and re.fullmatch(r"\d+\.\d+\.\d+", version.__version__)
    with open(os.path.join(ROOT, "setup.py")) as handle:
        assert "version=" not in handle.read()


def test_dev_extra_is_requirements_dev():
    with open(os.path.join(ROOT, "requirements-dev.txt")) as handle:
        pinned = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    assert _pyproject()["project"]["optional-dependencies"]["dev"] == pinned


def test_console_script_is_the_cli():
    from jacfast.cli import main

    assert _pyproject()["project"]["scripts"] == {"jacfast": "jacfast.cli:main"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def _installed() -> bool:
    import jacfast

    return os.path.commonpath([os.path.abspath(jacfast.__file__), ROOT]) != ROOT


def test_installed_package_loads_its_extension():
    """The copy pip installed, not the source tree, serves the CPU kernels: its own jacfast._C,
    checked against a float64 loss and gradient built here with torch.autograd.grad."""
    if not _installed():
        assert not EXPECT_INSTALLED, "JACFAST_EXPECT_INSTALLED=1 but jacfast is imported from the source tree"
        pytest.skip("jacfast is imported from the source tree; `make install-check` runs this on an installed copy")
    import jacfast
    import jacfast._C

    package = os.path.dirname(os.path.abspath(jacfast.__file__))
    assert os.path.dirname(os.path.abspath(jacfast._C.__file__)) == package
    assert jacfast.backends()["cpu"].available, jacfast.backends()["cpu"].reason

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 2, 37, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 2, 37, generator=gen, dtype=torch.float64)
    loss = jacfast.jacobian_matching_loss(student, teacher, kind="normalized", backend="cpu")
    (grad,) = torch.autograd.grad(loss, student)

    s = student.detach().clone().requires_grad_(True)
    eps = 1e-12  # jacfast's default eps: far below these rows' norms, so max(norm, eps) is the norm
    unit_s = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    unit_t = teacher / teacher.norm(dim=-1, keepdim=True).clamp_min(eps)
    want = (unit_s - unit_t).pow(2).sum(-1).sum(-1).mean()  # sum over K outputs, mean over B samples
    (want_grad,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_installed_console_script_runs():
    if not _installed():
        assert not EXPECT_INSTALLED, "JACFAST_EXPECT_INSTALLED=1 but jacfast is imported from the source tree"
        pytest.skip("runs on an installed copy (`make install-check`)")
    script = os.path.join(os.path.dirname(sys.executable), "jacfast")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "check" in result.stdout and "bench" in result.stdout
