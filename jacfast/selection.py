"""Output selections for :func:`jacfast.input_jacobians`: which K outputs per sample get a Jacobian row.

Each :class:`Selection` maps the detached logits (B, C) to ``(indices (B, K) int64, seeds
(K, B, C))``, the one-hot (or projection) cotangents of the K backward passes. Ties break
toward the lower index. Factories live in the :class:`select` namespace
(``jacfast.select.topk(5, logits=teacher_logits)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from jacfast.ops.topk_seeds import _check_k, topk_seeds

def _one_hot_seeds(indices: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """(B, K) indices -> (K, B, C) one-hot seeds: seeds[k, b] = one_hot(indices[b, k])."""
    batch, rows = indices.shape
    seeds = torch.zeros((rows, batch, classes), dtype=dtype, device=indices.device)
    return seeds.scatter_(2, indices.t().unsqueeze(-1), 1)


def _check_indices(name: str, idx: Tensor, batch: int, classes: int, device) -> Tensor:
    """Validate explicit output indices and broadcast them to (B, K) int64 on ``device``."""
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.dim() == 1:
        idx = idx.unsqueeze(0).expand(batch, -1)
    if idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B, K) with B = {batch}, or (K,), got {tuple(idx.shape)}")
    if idx.shape[1] < 1:
        raise ValueError(f"{name} must select at least one output per sample (K >= 1)")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= classes):
        raise ValueError(
            f"{name} out of range: the model has C = {classes} outputs, got values in "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return idx.to(device=device, dtype=torch.int64).contiguous()


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")


class Selection:
    """Which Jacobian rows to take: turns model outputs into indices and backward seeds."""

    def rows(self) -> Optional[int]:
        """K, the number of rows per sample, when it is known before the forward pass."""
        return None

    def resolve(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """For the detached model outputs ``logits`` (B, C): indices (B, K) int64 and seeds
        (K, B, C) in ``logits.dtype`` (row k of sample b is the VJP of seeds[k, b])."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class TopK(Selection):
    """The k largest outputs of ``logits`` (B, C) if given (the teacher's, so that teacher
    and student use the same outputs), else of the model's own output. Fused kernel."""

    k: int
    logits: Optional[Tensor] = None
    backend: str = "auto"

    def __post_init__(self):
        _check_positive_int("k", self.k)
        if self.logits is not None:
            if not isinstance(self.logits, Tensor) or self.logits.dim() not in (2, 3):
                raise ValueError("logits must be a (B, C) or (B, L, C) tensor (the teacher's outputs) or None")
            object.__setattr__(self, "logits", self.logits.detach())

    def rows(self):
        return self.k

    def resolve(self, logits):
        source = logits
        if self.logits is not None:
            if tuple(self.logits.shape) != tuple(logits.shape):
                raise ValueError(
                    f"logits given to select.topk have shape {tuple(self.logits.shape)}, but the model's "
                    f"output has shape {tuple(logits.shape)}: they must be the same (B, C)"
                )
            source = self.logits.to(logits.device)
        k = _check_k(self.k, logits.shape[1])
        indices, seeds = topk_seeds(source, k, backend=self.backend)
        return indices, seeds.to(logits.dtype)


@dataclass(frozen=True, eq=False)
class Target(Selection):
    """The target class of each sample: ``target`` (B,) integer labels -> K = 1.

    For sequence outputs (B, L, C): ``target`` (B, L), one label per position; positions
    whose label is ``ignore_index`` (default -100, as ``F.cross_entropy``) get all-zero rows.
    """

    target: Tensor
    ignore_index: int = -100

    def rows(self):
        return 1

    def resolve(self, logits):
        batch, classes = logits.shape
        if not isinstance(self.target, Tensor) or self.target.dim() != 1 or self.target.shape[0] != batch:
            shape = tuple(self.target.shape) if isinstance(self.target, Tensor) else type(self.target).__name__
            raise ValueError(f"target must be a (B,) tensor of class indices with B = {batch}, got {shape}")
        idx = _check_indices("target", self.target.unsqueeze(1), batch, classes, logits.device)
        return idx, _one_hot_seeds(idx, classes, logits.dtype)


@dataclass(frozen=True, eq=False)
class AllOutputs(Selection):
    """Every output: K = C. ``num_outputs`` (C), if given, is checked and lets
    ``strategy="replicate"`` know K before the forward pass."""

    num_outputs: Optional[int] = None

    def rows(self):
        return self.num_outputs

    def resolve(self, logits):
        batch, classes = logits.shape
        if self.num_outputs is not None and self.num_outputs != classes:
            raise ValueError(f"num_outputs = {self.num_outputs} but the model has C = {classes} outputs")
        idx = torch.arange(classes, device=logits.device).expand(batch, classes).contiguous()
        return idx, _one_hot_seeds(idx, classes, logits.dtype)


@dataclass(frozen=True, eq=False)
class Indices(Selection):
    """Explicit outputs: ``indices`` (B, K), or (K,) for the same outputs in every sample."""

    indices: Tensor

    def __post_init__(self):
        if not isinstance(self.indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(self.indices).__name__}")
        if self.indices.dim() not in (1, 2):
            raise ValueError(f"indices must have shape (B, K) or (K,), got {tuple(self.indices.shape)}")

    def rows(self):
        return self.indices.shape[-1]

    def resolve(self, logits):
        batch, classes = logits.shape
        idx = _check_indices("indices", self.indices, batch, classes, logits.device)
        return idx, _one_hot_seeds(idx, classes, logits.dtype)


@dataclass(frozen=True, eq=False)
class Projections(Selection):
    """K random output-space directions v_k (Hutchinson): row k is v_k[b]^T J_b.

    The v_k have E[v v^T] = I ("rademacher": entries +-1, "gaussian": N(0, 1)), so
    ``jac.square().sum(dims) / K`` is an unbiased estimate of ||J_b||_F^2 (the Jacobian-norm
    penalty) at the cost of K rows instead of C. Without ``vectors`` the directions are drawn
    anew at every call from ``generator`` (or the global RNG); to use the same directions
    for teacher and student, draw them once with :meth:`sample` and pass ``vectors``
    (K, B, C) or (K, C) (the same directions for every sample). Indices are -1.
    """

    k: int
    generator: Optional[torch.Generator] = None
    distribution: str = "rademacher"
    vectors: Optional[Tensor] = None

    def __post_init__(self):
        _check_positive_int("k", self.k)
        if self.distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {self.distribution!r}")
        if self.vectors is not None:
            v = self.vectors
            if not isinstance(v, Tensor) or v.dim() not in (2, 3) or v.shape[0] != self.k:
                raise ValueError(f"vectors must be a (K, B, C) or (K, C) tensor with K = k = {self.k}")
            object.__setattr__(self, "vectors", v.detach())

    def rows(self):
        return self.k

    def sample(self, batch: int, classes: int, dtype=torch.float32, device=None) -> Tensor:
        """Draw (K, B, C) directions from ``generator`` (what ``resolve`` does without ``vectors``)."""
        gen_device = self.generator.device if self.generator is not None else device
        shape = (self.k, batch, classes)
        if self.distribution == "rademacher":
            v = torch.randint(0, 2, shape, generator=self.generator, device=gen_device).mul_(2).sub_(1)
        else:
            v = torch.randn(shape, generator=self.generator, device=gen_device)
        return v.to(device=device, dtype=dtype)

    def resolve(self, logits):
        batch, classes = logits.shape
        if self.vectors is None:
            seeds = self.sample(batch, classes, logits.dtype, logits.device)
        else:
            v = self.vectors.to(device=logits.device, dtype=logits.dtype)
            if v.dim() == 2:
                v = v.unsqueeze(1).expand(self.k, batch, v.shape[-1])
            if tuple(v.shape) != (self.k, batch, classes):
                raise ValueError(f"vectors must have shape (K, B, C) = {(self.k, batch, classes)}, got {tuple(v.shape)}")
            seeds = v.contiguous()
        return torch.full((batch, self.k), -1, dtype=torch.int64, device=logits.device), seeds


@dataclass(frozen=True, eq=False)
class ByFunction(Selection):
    """Any rule ``fn(logits (B, C) detached) -> indices (B, K)``."""

    fn: Callable[[Tensor], Tensor]

    def resolve(self, logits):
        idx = self.fn(logits)
        if not isinstance(idx, Tensor):
            raise TypeError(f"select function must return an index tensor (B, K), got {type(idx).__name__}")
        idx = _check_indices("indices returned by the select function", idx, *logits.shape, logits.device)
        return idx, _one_hot_seeds(idx, logits.shape[1], logits.dtype)


class select:  # noqa: N801  (a namespace: jacfast.select.topk(5))
    """Factories of :class:`Selection` for :func:`input_jacobians`."""

    topk = staticmethod(TopK)
    target = staticmethod(Target)
    indices = staticmethod(Indices)
    projections = staticmethod(Projections)
    function = staticmethod(ByFunction)

    @staticmethod
    def all(num_outputs: Optional[int] = None) -> AllOutputs:  # noqa: A003
        return AllOutputs(num_outputs)

    @staticmethod
    def sample(m: int, seed: int = 0, within: Optional[Tensor] = None):
        """Position selection for sequence outputs: m random positions per sample (``positions=``),
        see :mod:`jacfast.sequence`."""
        from jacfast.sequence import SamplePositions

        return SamplePositions(m, seed=seed, within=within)


def as_selection(sel) -> Selection:
    """A Selection, an index tensor ((B, K) or (K,): explicit indices) or a callable."""
    if isinstance(sel, Selection):
        return sel
    if isinstance(sel, Tensor):
        return Indices(sel)
    if callable(sel):
        return ByFunction(sel)
    raise TypeError(
        "select must be a jacfast.select.* selection (topk, target, all, indices, projections), "
        f"an index tensor or a callable, got {type(sel).__name__}"
    )
