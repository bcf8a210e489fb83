"""TeacherCache: contents, reuse in DistillationLoss, refusal of changed data/settings, atomic writes."""
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jacfast.jacobians import input_jacobians, select
from jacfast.losses import DistillationLoss
from jacfast.teacher_cache import CacheMismatchError, TeacherCache, WithIndices

C, N, IN = 6, 21, (2, 5, 5)


def teacher_net():
    # BatchNorm + dropout: the cache must be built in eval mode (per-sample, deterministic rows)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(100, C))


def student_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.Tanh(), nn.Linear(8, C))


def dataset():
    return torch.randn(N, *IN), torch.randint(0, C, (N,))


def build(path, teacher, data, **kw):
    kw.setdefault("batch_size", 8)
    return TeacherCache.build(str(path), teacher, data, progress=False, strategy="loop", **kw)


def test_contents_match_the_teacher_and_mode_is_restored(tmp_path):
    teacher, (X, Y) = teacher_net().train(), dataset()
    cache = build(tmp_path / "c", teacher, (X, Y), k=2)
    assert teacher.training  # restored after the eval-mode build
    assert (len(cache), cache.num_classes, cache.k, cache.dtype) == (N, C, 2, torch.float32)
    logits, jac, idx = input_jacobians(teacher.eval(), X, select.topk(2))
    got = cache[torch.arange(N)]
    torch.testing.assert_close(got.logits, logits)
    torch.testing.assert_close(got.jac, jac)
    assert torch.equal(got.indices, idx)
    part = cache[[5, 0, 17]]
    assert torch.equal(part.indices, idx[[5, 0, 17]]) and part.jac.shape == (3, 2, *IN)
    torch.testing.assert_close(cache[3:6].logits, logits[3:6])
    with pytest.raises(IndexError):
        cache[[N]]


def test_bf16_storage_target_and_all(tmp_path):
    teacher, (X, Y) = teacher_net().eval(), dataset()
    f32 = build(tmp_path / "f32", teacher, (X, Y), select="target")
    b16 = build(tmp_path / "b16", teacher, (X, Y), select="target", dtype="bfloat16", batch_size=5)
    assert b16.dtype == torch.bfloat16 and b16[[0]].jac.dtype == torch.bfloat16
    assert os.path.getsize(tmp_path / "b16") < os.path.getsize(tmp_path / "f32")
    assert torch.equal(f32[torch.arange(N)].indices[:, 0], Y)
    torch.testing.assert_close(b16[torch.arange(N)].jac.float(), f32[torch.arange(N)].jac, rtol=1e-2, atol=1e-2)
    everything = build(tmp_path / "all", teacher, (X, Y), select="all")
    assert everything.k == C
    with pytest.raises(ValueError, match="labels"):
        build(tmp_path / "nolabels", teacher, X, select="target")


def test_cached_outputs_give_the_same_loss(tmp_path):
    teacher, student, (X, Y) = teacher_net().eval(), student_net(), dataset()
    TeacherCache.open_or_build(str(tmp_path / "c"), teacher, TensorDataset(X, Y), k=3, progress=True)
    cache = TeacherCache.open_or_build(str(tmp_path / "c"), teacher, TensorDataset(X, Y), k=3)  # opens
    loss = DistillationLoss(teacher, k=3, backend="torch", strategy="loop")
    loader = DataLoader(WithIndices(TensorDataset(X, Y)), batch_size=6, shuffle=True)
    for idx, x, y in loader:
        direct = loss(student, x, y)
        cached = loss(student, x, y, teacher_outputs=cache[idx])
        torch.testing.assert_close(cached.total, direct.total)
        g1 = torch.autograd.grad(direct.total, list(student.parameters()))
        g2 = torch.autograd.grad(cached.total, list(student.parameters()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    # No teacher at all: everything comes from the cache.
    idx = torch.tensor([2, 4])
    out = DistillationLoss(None, k=3, strategy="loop")(student, X[idx], Y[idx], teacher_outputs=cache[idx])
    assert torch.isfinite(out.total)


def test_changed_data_teacher_or_settings_are_refused(tmp_path):
    teacher, (X, Y) = teacher_net().eval(), dataset()
    path = str(tmp_path / "c")
    build(path, teacher, (X, Y), k=2)
    TeacherCache.open(path, teacher, (X, Y), k=2)  # unchanged: fine
    for kw, what in ((dict(k=3), "k: cache 2, requested 3"), (dict(k=2, dtype="bfloat16"), "dtype"),
                     (dict(select="target"), "select")):
        with pytest.raises(CacheMismatchError, match=what):
            TeacherCache.open(path, teacher, (X, Y), **kw)
    X2 = X.clone()
    X2[N // 3, 0, 1, 1] += 1e-3  # one value of one sample (not at a sampled position)
    with pytest.raises(CacheMismatchError, match="data set changed"):
        TeacherCache.open(path, teacher, (X2, Y), k=2)
    TeacherCache.open(path, teacher, (X2, Y), k=2, verify="sample")  # the documented trade-off
    Y2 = Y.clone()
    Y2[0] = (Y2[0] + 1) % C
    for data in ((X, Y2), (X[:-1], Y[:-1])):
        for verify in ("full", "sample"):
            with pytest.raises(CacheMismatchError, match="data set changed"):
                TeacherCache.open(path, teacher, data, k=2, verify=verify)
    other = teacher_net().eval()
    with pytest.raises(CacheMismatchError, match="teacher changed"):
        TeacherCache.open(path, other, (X, Y), k=2)
    with pytest.raises(CacheMismatchError, match="other settings"):
        TeacherCache.open_or_build(path, teacher, (X, Y), k=1)
    with pytest.raises(FileExistsError):
        build(path, teacher, (X, Y), k=2)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a cache at all")
    with pytest.raises(CacheMismatchError, match="not a jacfast teacher cache"):
        TeacherCache.open(str(junk), teacher, (X, Y))


class Failing(nn.Module):
    """A teacher that raises on its third batch."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.net(x)


def test_write_is_atomic(tmp_path):
    teacher, (X, Y) = teacher_net().eval(), dataset()
    path = str(tmp_path / "c")
    with pytest.raises(RuntimeError, match="boom"):
        build(path, Failing(teacher), (X, Y))
    assert os.listdir(tmp_path) == []  # neither the cache nor a temporary file
    good = build(path, teacher, (X, Y))
    before = good[torch.arange(N)].jac.clone()
    with pytest.raises(RuntimeError, match="boom"):
        build(path, Failing(teacher), (X, Y), overwrite=True)
    assert os.listdir(tmp_path) == ["c"]  # the old cache is intact
    torch.testing.assert_close(TeacherCache.open(path, teacher, (X, Y))[torch.arange(N)].jac, before)


def test_bad_arguments(tmp_path):
    teacher, (X, Y) = teacher_net().eval(), dataset()
    for kw in (dict(dtype="int8"), dict(select="top"), dict(k=0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            build(tmp_path / "c", teacher, (X, Y), **kw)
    with pytest.raises(ValueError, match="k <= C"):  # K larger than the number of outputs
        build(tmp_path / "c", teacher, (X, Y), k=7)
    with pytest.raises(TypeError):
        build(tmp_path / "c", teacher, 3)
    with pytest.raises(ValueError):
        build(tmp_path / "c", teacher, X[:0])
    assert os.listdir(tmp_path) == []
