"""Jacobian rows of sequence outputs (B, L, C): position selection and per-position output selection.

A selection of :mod:`jacfast.selection` picks Kp outputs at each of P selected positions, so a
sample has K' = P * Kp rows, ordered position-major (row p * Kp + j: output j of position p).
Positions (``positions=``):

- None: all L positions (P = L);
- a bool Tensor (B, L), True = use: P = the largest count in the batch, samples with fewer
  get all-zero padding rows (pass an attention mask to skip padding);
- an integer Tensor (B, P) or (P,) of positions in [0, L);
- ``select.sample(m, seed=0, within=None)``: m random distinct positions per sample (P = m),
  drawn from ``seed`` and the object's call counter (a new draw per call, the same draw for
  teacher and student inside one loss call); ``within`` (B, L) bool restricts the draw to
  True positions (fewer than m of them: zero padding rows).

Ignored rows (``select.target(y, ignore_index=-100)`` on a position whose target is ignored,
padding rows) are all-zero rows for every model, so a matching loss of such a row is exactly
0 (the normalized kind divides by max(||row||, eps)); a sample with every position ignored
contributes 0, never NaN. The rows are those of the selected scalars ``vals = plan.pick(out)``
(N, K'), so the cost is K' backward passes ("loop") or one vmapped backward over K' rows
("batched"), not L * C.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from jacfast.selection import AllOutputs, ByFunction, Indices, Projections, Target, TopK, _check_indices


# ----------------------------------------------------------------------------- positions
class SamplePositions:
    """m random positions per sample, seeded (see the module docstring)."""

    def __init__(self, m: int, seed: int = 0, within: Optional[Tensor] = None):
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"select.sample: m must be a positive int, got {m!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"select.sample: seed must be an int, got {type(seed).__name__}")
        if within is not None and (not isinstance(within, Tensor) or within.dtype != torch.bool or within.dim() != 2):
            raise ValueError("select.sample: within must be a bool Tensor (B, L) or None, got "
                             f"{tuple(within.shape) if isinstance(within, Tensor) else type(within).__name__}")
        self.m, self.seed, self.within, self.step = m, seed, within, 0

    def draw(self) -> "DrawnPositions":
        """The positions of one call (advances the counter)."""
        drawn = DrawnPositions(self.m, self.seed, self.step, self.within)
        self.step += 1
        return drawn

    def __repr__(self) -> str:
        return f"select.sample({self.m}, seed={self.seed})"


@dataclass(frozen=True, eq=False)
class DrawnPositions:
    """One call's draw of :class:`SamplePositions`: deterministic in (seed, step, B, L)."""

    m: int
    seed: int
    step: int
    within: Optional[Tensor]

    def resolve(self, batch: int, length: int, device) -> tuple[Tensor, Tensor]:
        if self.m > length:
            raise ValueError(f"positions=select.sample({self.m}): m = {self.m} is more than the L = {length} "
                             "positions of the model's output (B, L, C)")
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) % (2**63))
        scores = torch.rand(batch, length, generator=gen)
        if self.within is not None:
            within = _check_mask("select.sample(within=...)", self.within, batch, length).cpu()
            scores = torch.where(within, scores, scores + 2)  # the unmasked ones are drawn last
        pos = scores.argsort(1)[:, : self.m].sort(1).values
        valid = torch.ones_like(pos, dtype=torch.bool) if self.within is None else within.gather(1, pos)
        return pos.to(device), valid.to(device)


def _check_mask(name: str, mask: Tensor, batch: int, length: int) -> Tensor:
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must be a bool mask of shape (B, L) = {(batch, length)} (the model's output is "
                         f"(B, L, C)), got {tuple(mask.shape)}")
    return mask


def resolve_positions(positions, batch: int, length: int, device) -> tuple[Tensor, Tensor]:
    """positions -> (pos (B, P) int64, valid (B, P) bool), P >= 1."""
    if positions is None:
        pos = torch.arange(length, device=device).expand(batch, length)
        return pos, torch.ones(batch, length, dtype=torch.bool, device=device)
    if isinstance(positions, SamplePositions):
        positions = positions.draw()
    if isinstance(positions, DrawnPositions):
        return positions.resolve(batch, length, device)
    if not isinstance(positions, Tensor):
        raise TypeError("positions must be None, a bool mask (B, L), an integer tensor of positions (B, P) / (P,) "
                        f"or select.sample(m), got {type(positions).__name__}")
    if positions.dtype == torch.bool:
        mask = _check_mask("positions", positions, batch, length).to(device)
        count = int(mask.sum(1).max()) if mask.numel() else 0
        # Stable sort of ~mask puts each sample's True positions first, in order.
        order = (~mask).to(torch.int8).sort(dim=1, stable=True).indices[:, : max(count, 1)]
        return order, mask.gather(1, order)
    if positions.dtype.is_floating_point or positions.dtype.is_complex:
        raise TypeError(f"positions must be a bool mask or an integer tensor, got {positions.dtype}")
    pos = positions.unsqueeze(0).expand(batch, -1) if positions.dim() == 1 else positions
    if pos.dim() != 2 or pos.shape[0] != batch or pos.shape[1] < 1:
        raise ValueError(f"positions must have shape (B, P) with B = {batch}, or (P,), P >= 1; got "
                         f"{tuple(positions.shape)}")
    if int(pos.min()) < 0 or int(pos.max()) >= length:
        raise ValueError(f"positions out of range: the model's output has L = {length} positions, got values in "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    pos = pos.to(device=device, dtype=torch.int64)
    return pos, torch.ones(pos.shape, dtype=torch.bool, device=device)


def freeze(positions):
    """What one call uses: a :class:`SamplePositions` is drawn once here (its counter advances)."""
    return positions.draw() if isinstance(positions, SamplePositions) else positions


# ----------------------------------------------------------------------------- row plans
@dataclass(frozen=True, eq=False)
class RowPlan:
    """The K' rows of a batch of sequence outputs (B, L, C).

    flat (B, K') int64: position * C + class of each one-hot row (-1 for zero rows and for
    projection rows); pos (B, K') int64: the position of each row; valid (B, K') bool
    (False: an all-zero row); proj (B, K', C) directions of projection rows, or None.
    """

    flat: Tensor
    pos: Tensor
    valid: Tensor
    proj: Optional[Tensor]
    length: int
    classes: int

    @property
    def rows(self) -> int:
        return self.flat.shape[1]

    @property
    def indices(self) -> Tensor:
        return torch.where(self.valid, self.flat, torch.full_like(self.flat, -1))

    def check(self, out: Tensor, who: str = "model") -> None:
        if out.dim() != 3 or tuple(out.shape[1:]) != (self.length, self.classes) or out.shape[0] % self.flat.shape[0]:
            raise ValueError(f"the {who}'s output has shape {tuple(out.shape)}, but the rows were selected for "
                             f"sequence outputs (B={self.flat.shape[0]}, L={self.length}, C={self.classes})")

    def pick(self, out: Tensor) -> Tensor:
        """The selected scalars (N, K') of outputs (N, L, C), N a multiple of B (row n: sample n % B)."""
        reps = out.shape[0] // self.flat.shape[0]
        valid = self.valid.repeat(reps, 1) if reps > 1 else self.valid
        if self.proj is None:
            flat = self.flat.clamp_min(0)
            vals = out.reshape(out.shape[0], -1).gather(1, flat.repeat(reps, 1) if reps > 1 else flat)
        else:
            pos = self.pos.repeat(reps, 1) if reps > 1 else self.pos
            rows = out.gather(1, pos.unsqueeze(-1).expand(*pos.shape, out.shape[2]))
            proj = self.proj.repeat(reps, 1, 1) if reps > 1 else self.proj
            vals = (rows * proj.to(rows.dtype)).sum(-1)
        return torch.where(valid, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))


def plan_rows(sel, logits: Tensor, positions) -> RowPlan:
    """The rows that selection ``sel`` takes at ``positions`` of sequence logits (B, L, C) (detached)."""
    batch, length, classes = logits.shape
    pos, pvalid = resolve_positions(positions, batch, length, logits.device)
    npos = pos.shape[1]
    gathered = logits.gather(1, pos.unsqueeze(-1).expand(batch, npos, classes)).reshape(batch * npos, classes)
    proj, tvalid = None, None
    if isinstance(sel, TopK):
        source = gathered
        if sel.logits is not None:
            if tuple(sel.logits.shape) != tuple(logits.shape):
                raise ValueError(f"logits given to select.topk have shape {tuple(sel.logits.shape)}, but the model's "
                                 f"output has shape {tuple(logits.shape)}: they must be the same (B, L, C)")
            src = sel.logits.to(logits.device)
            source = src.gather(1, pos.unsqueeze(-1).expand(batch, npos, classes)).reshape(batch * npos, classes)
        if sel.k > classes:
            raise ValueError(f"select.topk: k must satisfy 1 <= k <= C = {classes}, got k = {sel.k}")
        cls = torch.sort(source, dim=1, descending=True, stable=True).indices[:, : sel.k]
    elif isinstance(sel, Target):
        target = sel.target
        if not isinstance(target, Tensor) or tuple(target.shape) != (batch, length):
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"target must be a (B, L) = {(batch, length)} tensor of class indices for sequence "
                             f"outputs (B, L, C) = {tuple(logits.shape)}, got {shape}")
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor, got {target.dtype}")
        t = target.to(logits.device).long().gather(1, pos).reshape(-1)
        tvalid = t != sel.ignore_index
        bad = tvalid & ((t < 0) | (t >= classes))
        if bool(bad.any()):
            raise ValueError(f"target out of range: the model has C = {classes} outputs; targets must be in "
                             f"[0, {classes}) or ignore_index = {sel.ignore_index}, got {int(t[bad][0])}")
        cls = torch.where(tvalid, t, torch.zeros_like(t)).unsqueeze(1)
        tvalid = tvalid.unsqueeze(1)
    elif isinstance(sel, AllOutputs):
        if sel.num_outputs is not None and sel.num_outputs != classes:
            raise ValueError(f"num_outputs = {sel.num_outputs} but the model has C = {classes} outputs")
        cls = torch.arange(classes, device=logits.device).expand(batch * npos, classes)
    elif isinstance(sel, Indices):
        idx = sel.indices
        if idx.dim() == 2:
            idx = _check_indices("indices", idx, batch, classes, logits.device).repeat_interleave(npos, 0)
        cls = _check_indices("indices", idx, batch * npos, classes, logits.device)
    elif isinstance(sel, ByFunction):
        got = sel.fn(gathered)
        if not isinstance(got, Tensor):
            raise TypeError(f"select function must return an index tensor (N, K), got {type(got).__name__}")
        cls = _check_indices("indices returned by the select function (given the (N = B * P, C) logits of the "
                             "selected positions)", got, batch * npos, classes, logits.device)
    elif isinstance(sel, Projections):
        k = sel.k
        if sel.vectors is None:
            v = sel.sample(batch * npos, classes, logits.dtype, logits.device).transpose(0, 1)  # (B*P, K, C)
        else:
            v = sel.vectors.to(device=logits.device, dtype=logits.dtype)
            if v.shape[-1] != classes or (v.dim() == 3 and v.shape[1] != batch):
                raise ValueError(f"vectors must have shape (K, B, C) = {(k, batch, classes)} or (K, C), got "
                                 f"{tuple(v.shape)}")
            v = (v.unsqueeze(1).expand(k, batch, classes) if v.dim() == 2 else v).transpose(0, 1)
            v = v.repeat_interleave(npos, 0)
        proj = v.reshape(batch, npos * k, classes).contiguous()
        cls = torch.zeros(batch * npos, k, dtype=torch.int64, device=logits.device)
    else:
        raise TypeError(f"selection {type(sel).__name__} has no per-position form for sequence outputs (B, L, C)")
    kp = cls.shape[1]
    flat = (pos.unsqueeze(-1) * classes + cls.reshape(batch, npos, kp)).reshape(batch, npos * kp)
    valid = pvalid.unsqueeze(-1).expand(batch, npos, kp)
    if tvalid is not None:
        valid = valid & tvalid.reshape(batch, npos, 1)
    if proj is not None:
        flat = torch.full_like(flat, -1)
    pos_rows = pos.unsqueeze(-1).expand(batch, npos, kp).reshape(batch, npos * kp)
    return RowPlan(flat.contiguous(), pos_rows.contiguous(), valid.reshape(batch, npos * kp).contiguous(), proj,
                   length, classes)


def plan_from_indices(indices: Tensor, length: int, classes: int) -> RowPlan:
    """The plan of stored one-hot rows (B, K') flat indices, -1 for zero rows (a teacher cache)."""
    valid = indices >= 0
    return RowPlan(indices.long(), indices.clamp_min(0).div(classes, rounding_mode="floor"), valid, None,
                   length, classes)


def known_rows(sel, positions) -> Optional[int]:
    """K' before the forward pass, when positions and the selection tell it; else None."""
    kp = sel.rows()
    if kp is None or positions is None or isinstance(sel, ByFunction):
        return None
    if isinstance(positions, (SamplePositions, DrawnPositions)):
        return positions.m * kp
    if isinstance(positions, Tensor):
        if positions.dtype == torch.bool:
            return max(int(positions.sum(1).max()) if positions.numel() else 0, 1) * kp
        return positions.shape[-1] * kp
    return None
