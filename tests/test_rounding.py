"""The CPU kernels' rounding of float64 results to bfloat16 / float16 (csrc/cpu): once, to
nearest even, bit for bit against a Fraction-based reference, in every ISA clone, on values
where rounding through float first would go wrong (grid midpoints nudged by less than a
float ulp), subnormals, overflow edges, inf and NaN."""
import math
import os
import random
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from jacfast import registry

# (significand bits, smallest normal exponent, largest finite value, torch dtype)
FORMATS = {"bf16": (8, -126, float.fromhex("0x1.fep127"), torch.bfloat16),
           "half": (11, -14, 65504.0, torch.float16)}


def round_once(x: float, fmt: str) -> float:
    """x rounded to the grid of ``fmt`` once, to nearest even, exactly (overflow -> inf)."""
    p, emin, largest, _ = FORMATS[fmt]
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    exp = math.frexp(abs(x))[1] - 1  # 2^exp <= |x| < 2^(exp+1)
    q = max(exp, emin) - (p - 1)  # grid spacing 2^q
    scaled = Fraction(abs(x)) / Fraction(2) ** q
    n = math.floor(scaled)
    rest = scaled - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1):
        n += 1
    value = math.ldexp(n, q)
    return math.copysign(math.inf if value > largest else value, x)


def hard_values(fmt: str, rng: random.Random, count: int = 3000) -> list:
    """Random values of every magnitude, grid midpoints nudged by less than a float ulp (where
    rounding to float first creates a false tie), subnormals, overflow edges, inf, NaN."""
    p, emin, largest, _ = FORMATS[fmt]
    lo, hi = emin - p - 3, math.frexp(largest)[1] + 1
    values = []
    for _ in range(count):
        e = rng.randint(lo, hi)
        q = max(e, emin) - (p - 1)
        mid = math.ldexp(2 * rng.randint(0, 2 ** p) + 1, q - 1)  # a midpoint of the grid
        nudge = rng.choice([0.0, 1.0, -1.0]) * math.ldexp(mid, -rng.randint(25, 52))
        plain = math.ldexp(rng.random() + 0.5, e)
        values += [rng.choice([-1, 1]) * v for v in (mid + nudge, mid, plain)]
    values += [largest, math.nextafter(largest, math.inf), float.fromhex("0x1.fffffep127"), 1e300, -1e300,
               math.ldexp(1, emin - p), math.ldexp(3, emin - p - 1), 5e-324, -0.0, math.inf, -math.inf, math.nan,
               65520.0, 65519.99, -65520.0]
    return values


def check(fmt: str, seed: int) -> None:
    import jacfast._C  # noqa: F401  (registers torch.ops.jacfast_cpu)

    rng = random.Random(seed)
    values = hard_values(fmt, rng)
    x = torch.tensor(values, dtype=torch.float64)
    dtype = FORMATS[fmt][3]
    # a float on the grid (half overflow: a float beyond 65504, which converts to inf)
    got = torch.ops.jacfast_cpu._round_to_grid(x, fmt == "bf16").to(dtype)
    want = torch.tensor([round_once(v, fmt) for v in values], dtype=torch.float64).to(dtype)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    bad = (~same).nonzero().flatten()[:5].tolist()
    assert not bad, f"{fmt}: {[(values[i].hex(), got[i].item(), want[i].item()) for i in bad]}"


def check_kernel(fmt: str, seed: int) -> None:
    """The same through the backward kernel (blocks, padded tail, F16C buffers for half in the
    AVX2 clone, vectors holding bf16 subnormals among normal values in the AVX-512 one): with
    coef = (c, 0, 0), t = 0 and per-row gradient 1, grad_s = c * s, rounded once."""
    import jacfast._C  # noqa: F401

    rng = random.Random(seed)
    values = hard_values(fmt, rng, count=400)
    dtype = FORMATS[fmt][3]
    scales = [1.0, -1.0, 2.0, 0.5, -0.25]
    D = 301  # whole 16-element blocks and a padded tail
    s = torch.tensor([[rng.choice(scales) for _ in range(D)] for _ in values], dtype=torch.float64)
    coef = torch.zeros(len(values), 3, dtype=torch.float64)
    coef[:, 0] = torch.tensor(values, dtype=torch.float64)
    grad, _ = torch.ops.jacfast_cpu.backward(torch.ones(len(values)), s.to(dtype), torch.zeros_like(s).to(dtype),
                                             coef, 0, 1.0, True, False)
    table = {(v if not math.isnan(v) else "nan", k): round_once(v * k, fmt) for v in values for k in scales}
    want = torch.tensor([[table[(v if not math.isnan(v) else "nan", k)] for k in row] for v, row in
                         zip(values, s.tolist())], dtype=torch.float64).to(dtype)
    same = (grad.view(torch.int16) == want.view(torch.int16)) | (grad.isnan() & want.isnan())
    bad = (~same).nonzero()[:5].tolist()
    assert not bad, f"{fmt}: {[(values[r].hex(), s[r, c].item(), grad[r, c].item(), want[r, c].item()) for r, c in bad]}"


@pytest.fixture(autouse=True)
def _cpu_backend():
    status = registry.status_for("cpu", "cpu")
    if not status.available:
        pytest.skip(status.reason)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_rounding_once_to_nearest_even(fmt):
    seed = random.SystemRandom().randrange(2**32)
    check(fmt, seed)
    check_kernel(fmt, seed)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_rounding_in_other_isa_clones(isa):
    """The clone is picked once per process: the narrower ones run in a child process ("avx512":
    AVX-512 without its BF16 conversion, the integer bf16 path of CPUs that lack AVX512_BF16)."""
    seed = random.SystemRandom().randrange(2**32)
    code = ("import sys; sys.path.insert(0, 'tests'); import test_rounding as t; "
            f"[(t.check(f, {seed}), t.check_kernel(f, {seed})) for f in ('bf16', 'half')]")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JACFAST_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr[-3000:]
