"""The fused top-k + one-hot seeds op: every backend against jacfast.reference.topk_seeds and a
tie/NaN-aware oracle in plain Python."""
import math
import os

import pytest
import torch
from conftest import kernel_backends, second_gpu

from jacfast import reference, registry
from jacfast.ops.topk_seeds import topk_seeds

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (B, C, k): k = 1, k = C, odd and prime C, one class, rows longer than a cache line, large k.
SHAPES = [(1, 1, 1), (3, 7, 1), (5, 7, 7), (4, 13, 5), (17, 33, 16), (6, 101, 17), (2, 1001, 5), (3, 257, 200)]


def _fresh_seed() -> int:
    # Logits are drawn fresh on every run; the seed is printed on failure to reproduce it.
    return int.from_bytes(os.urandom(4), "little")


def oracle(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise ranking in plain Python: NaN first, then larger values, ties to the lower index."""
    rows = logits.double().cpu().tolist()
    out = []
    for row in rows:

        def key(i, row=row):
            nan = math.isnan(row[i])
            return (0 if nan else 1, 0.0 if nan else -row[i], i)

        out.append(sorted(range(len(row)), key=key)[:k])
    return torch.tensor(out, dtype=torch.int64).reshape(len(rows), k)


def expected_seeds(indices: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    batch, k = indices.shape
    seeds = torch.zeros(k, batch, classes, dtype=dtype)
    for b in range(batch):
        for j in range(k):
            seeds[j, b, indices[b, j]] = 1
    return seeds


def make_logits(kind: str, batch: int, classes: int, dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        x = torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # few distinct values: many ties, including whole tied rows
        x = torch.randint(-2, 3, (batch, classes), generator=gen).double()
        x[0] = 1.0
    elif kind == "nan":  # NaN, +-inf and signed zeros mixed with ties
        x = torch.randint(-1, 2, (batch, classes), generator=gen).double()
        u = torch.rand(batch, classes, generator=gen)
        x[u < 0.2] = float("nan")
        x[(u >= 0.2) & (u < 0.3)] = float("inf")
        x[(u >= 0.3) & (u < 0.4)] = float("-inf")
        x[(u >= 0.4) & (u < 0.5)] = -0.0
        x[-1, : (classes + 1) // 2] = float("nan")
    else:
        raise AssertionError(kind)
    return x.to(dtype)


def _skip_missing_kernels(backend: str) -> None:
    """Triton can be available while its topk_seeds kernel file does not exist yet."""
    if backend == "triton":
        try:
            registry.kernels("triton", "topk_seeds")
        except ModuleNotFoundError as exc:
            if exc.name == "jacfast.kernels.triton_topk_seeds":
                pytest.skip("jacfast/kernels/triton_topk_seeds.py does not exist")
            raise


ALL_BACKENDS = kernel_backends() + [pytest.param("torch", torch.device("cpu"), id="torch")]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_matches_oracle_and_torch_path(backend, device, dtype, kind):
    _skip_missing_kernels(backend)
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for batch, classes, k in SHAPES:
        logits = make_logits(kind, batch, classes, dtype, gen)
        indices, seeds = topk_seeds(logits.to(device), k, backend=backend)
        msg = f"seed={seed} shape={(batch, classes)} k={k}"
        assert indices.dtype == torch.int64 and indices.shape == (batch, k), msg
        assert seeds.dtype == dtype and seeds.shape == (k, batch, classes), msg
        assert indices.device == seeds.device == logits.to(device).device, msg
        expect = oracle(logits, k)
        assert torch.equal(indices.cpu(), expect), msg
        assert torch.equal(seeds.cpu(), expected_seeds(expect, classes, dtype)), msg
        ref_i, ref_s = reference.topk_seeds(logits, k)
        assert torch.equal(indices.cpu(), ref_i) and torch.equal(seeds.cpu(), ref_s), msg



@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_logits_on_a_device_that_is_not_the_current_one(backend):
    device = second_gpu(backend)
    logits = torch.randn(7, 1001, generator=torch.Generator().manual_seed(_fresh_seed()))
    indices, seeds = topk_seeds(logits.to(device), 5, backend=backend)
    assert indices.device == seeds.device == torch.device("cuda", 1)
    assert torch.equal(indices.cpu(), oracle(logits, 5))
    assert torch.equal(seeds.cpu(), expected_seeds(oracle(logits, 5), 1001, logits.dtype))
    assert torch.cuda.current_device() == 0

@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_layouts_and_empty_batch(backend, device):
    _skip_missing_kernels(backend)
    base = torch.randn(9, 6)
    logits = base.t().to(device)  # not contiguous: (6, 9)
    indices, seeds = topk_seeds(logits, 4, backend=backend)
    assert torch.equal(indices.cpu(), oracle(base.t(), 4))
    grad_logits = base.t().clone().requires_grad_(True).to(device)  # grad-requiring input: detached
    indices2, seeds2 = topk_seeds(grad_logits, 4, backend=backend)
    assert not seeds2.requires_grad and torch.equal(indices2, indices)
    empty_i, empty_s = topk_seeds(torch.randn(0, 5, device=device), 2, backend=backend)
    assert empty_i.shape == (0, 2) and empty_s.shape == (2, 0, 5)


def test_auto_backend_and_op_registration():
    logits = torch.randn(4, 10)
    i_auto, s_auto = topk_seeds(logits, 3)
    i_ref, s_ref = reference.topk_seeds(logits, 3)
    assert torch.equal(i_auto, i_ref) and torch.equal(s_auto, s_ref)
    # Schema, fake (meta) kernel and dispatch of the public op.
    torch.library.opcheck(
        torch.ops.jacfast.topk_seeds.default,
        (logits, 3, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )
    fake_i, fake_s = torch.ops.jacfast.topk_seeds(logits.to("meta"), 3, "torch")
    assert fake_i.shape == (4, 3) and fake_i.dtype == torch.int64 and fake_s.shape == (3, 4, 10)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_compiles_without_graph_break(backend, device):
    """Compiled graphs call the registered op; eager calls the kernel directly: same result."""
    logits = torch.randn(5, 23, device=device)
    compiled = torch.compile(lambda x: topk_seeds(x, 4, backend=backend), fullgraph=True, backend="aot_eager")
    got_i, got_s = compiled(logits)
    want_i, want_s = topk_seeds(logits, 4, backend=backend)
    assert torch.equal(got_i, want_i) and torch.equal(got_s, want_s)


def test_bad_inputs():
    with pytest.raises(TypeError, match="logits"):
        topk_seeds([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        topk_seeds(torch.randn(5), 1)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        topk_seeds(torch.randn(2, 3, 4), 1)
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        topk_seeds(torch.arange(6).reshape(2, 3), 1)
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_seeds(torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= C = 3"):
        topk_seeds(torch.randn(2, 3), 4)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_seeds(torch.randn(2, 3), 1.5)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_seeds(torch.randn(2, 3), True)
    with pytest.raises(ValueError, match="backend"):
        topk_seeds(torch.randn(2, 3), 1, backend="fast")
