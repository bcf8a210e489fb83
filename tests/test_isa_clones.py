"""The CPU kernels' ISA levels (AVX-512 with and without AVX512_BF16, AVX2, SSE2) compute the
same function: the 16 accumulator lanes and the FMA contractions are the same in AVX-512 and
AVX2, so those give identical bits, and every output is rounded once from the same float64
value (bf16/fp16 by different instructions); SSE2 has no FMA and may differ in the last bit.
The level is picked once per process, so each runs in a child process on the same inputs."""
import os
import random
import subprocess
import sys

import pytest
import torch

from jacfast import registry

LEVELS = ("avx512bf16", "avx512", "avx2", "base")  # the widest first; a level the CPU lacks runs a narrower one
CHILD = """
import sys, torch
from jacfast import registry
registry.kernels("cpu", "jacobian_matching")
ops = torch.ops.jacfast_cpu
g = torch.Generator().manual_seed(int(sys.argv[1]))
out = []
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for kind in (0, 1, 2):
        for rows, dim in ((37, 1001), (3, 9000)):  # a padded tail; rows of several 4096-element chunks
            s = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
            t = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
            grad_loss = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
            loss, grad = ops.forward_backward(s, t, kind, 0, 1e-12, 1.0)
            loss2, coef = ops.forward(s, t, kind, 1, 1e-12, 0.25)
            gs, gt = ops.backward(grad_loss, s, t, ops.forward(s, t, kind, 0, 1e-12, 1.0)[1], 0, 1.0, True, kind != 2)
            out.append([loss, grad, loss2, coef, gs, gt])
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    if not registry.status_for("cpu", "cpu").available:
        pytest.skip(registry.status_for("cpu", "cpu").reason)
    seed = random.SystemRandom().randrange(2**31)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for level in LEVELS:
        path = tmp_path_factory.mktemp(level) / "out.pt"
        done = subprocess.run([sys.executable, "-c", CHILD, str(seed), str(path)], cwd=root, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "JACFAST_CPU_ISA": level})
        assert done.returncode == 0, done.stderr[-3000:]
        results[level] = torch.load(path)
    return results


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_vector_levels_give_identical_bits(outputs, level):
    for case, (want, got) in enumerate(zip(outputs["avx512bf16"], outputs[level])):
        for name, a, b in zip(("loss", "grad", "sum loss", "coef", "grad_s", "grad_t"), want, got):
            assert torch.equal(_bits(a), _bits(b)), f"{level}: case {case}, {name} differs from avx512bf16"


def test_sse2_level_agrees_to_rounding(outputs):
    for case, (want, got) in enumerate(zip(outputs["avx512bf16"], outputs["base"])):
        for a, b in zip(want, got):
            # Both accumulate in float64, with and without FMA: their values differ by a few
            # units of 1e-16 of the tensor's scale (not of each element: a gradient element
            # c0 s - c1 t that cancels keeps that absolute difference), 1e-12 of it allowed;
            # the output is then rounded once, so one unit in its last place on top.
            rtol = {torch.float64: 1e-12, torch.float32: 2e-7, torch.bfloat16: 2**-7, torch.float16: 2**-10}[a.dtype]
            atol = 1e-12 * a.double().abs().max().item() if a.numel() else 0.0
            torch.testing.assert_close(b.double(), a.double(), rtol=rtol, atol=atol, msg=lambda m: f"case {case}: {m}")
