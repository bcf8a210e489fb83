"""What a batch is to a trainer: (model inputs, targets), moved between devices, fed to a model.

- ``batch_fn``: splits what the data yields into ``(inputs, targets)``. Default: a pair
  ``(x, y)``. A str key (``batch_fn="labels"``) splits a dict batch into the other entries
  (the model's keyword inputs) and that entry (the targets). A callable is used as given.
- inputs may be a Tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
  (``model(**x)``), as ``jacfast.model_io.ModelCall`` calls them; targets a Tensor, None
  (losses without labels) or any nesting of tensors.
- :class:`OnDevice`: a network kept on its own device (a teacher on another GPU): inputs go
  to its device, outputs come back to the device the inputs came from, both through autograd
  (so input Jacobians of the wrapped network are taken with respect to the caller's tensors).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # F.cross_entropy's default: targets with this value are left out


def pair_batch(batch) -> tuple[Any, Any]:
    """The default ``batch_fn``: a ``(x, y)`` pair (tuple or list of length 2)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        raise TypeError(f"a batch is a dict with keys {sorted(batch)}: pass batch_fn='<target key>' (e.g. "
                        "batch_fn='labels') or a callable batch -> (inputs, targets)")
    got = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else \
        type(batch).__name__
    raise TypeError(f"a batch must be an (x, y) pair by default, got {got}: pass batch_fn= (a callable "
                    "batch -> (inputs, targets), or a dict key)")


def make_batch_fn(batch_fn: Union[None, str, Callable]) -> Callable:
    """``batch_fn`` argument -> callable ``batch -> (inputs, targets)`` (see the module docstring)."""
    if batch_fn is None:
        return pair_batch
    if isinstance(batch_fn, str):
        key = batch_fn

        def split(batch):
            if not isinstance(batch, Mapping) or key not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise ValueError(f"batch_fn={key!r}: the batch has no entry {key!r} (got {keys})")
            return {k: v for k, v in batch.items() if k != key}, batch[key]

        split.__qualname__ = f"split_on_{key}"
        return split
    if callable(batch_fn):
        return batch_fn
    raise TypeError(f"batch_fn must be None, a str key or a callable, got {type(batch_fn).__name__}")


def map_tensors(obj, fn: Callable[[Tensor], Tensor]):
    """``obj`` with ``fn`` applied to every tensor in it (tuples, NamedTuples, lists, dicts,
    ModelOutput-like mappings, dataclasses); other leaves are returned untouched."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in obj.items()}
        if type(obj) is dict:
            return mapped
        try:  # a ModelOutput-like mapping: rebuilt as its own type when it takes keywords
            return type(obj)(**mapped)
        except TypeError:
            return mapped
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def to_device(obj, device, non_blocking: bool = False):
    """``obj`` with every tensor in it moved to ``device`` (a differentiable copy)."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking))


def first_tensor(obj) -> Optional[Tensor]:
    """The first tensor in ``obj`` (depth first), or None."""
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def batch_len(inputs) -> int:
    """Number of samples in a batch of model inputs: dim 0 of its first tensor."""
    t = first_tensor(inputs)
    if t is None or t.ndim == 0:
        raise TypeError(f"model inputs hold no batched tensor (got {type(inputs).__name__})")
    return int(t.shape[0])


def call_model(model: Callable, inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a Tensor, tuple/list or dict ``x``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def model_logits(model: Callable, inputs, outputs=None) -> Tensor:
    """The logits ``(B, C)`` or ``(B, L, C)`` of ``model`` on ``inputs``, picked from what it
    returns by ``outputs=`` as :class:`jacfast.model_io.ModelCall` does (same errors)."""
    from jacfast.model_io import ModelCall

    return ModelCall(model, outputs=outputs).logits(call_model(model, inputs))


def wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (16-bit losses are summed in fp32; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, C) with y (B,), or (B, L, C) with y (B, L) over the
    positions whose target is not -100 (their mean, so 0/0 = NaN if every target is ignored)."""
    if logits.ndim == 3:
        if y.shape != logits.shape[:2]:
            raise ValueError(f"sequence logits {tuple(logits.shape)} need targets (B, L) = "
                             f"{tuple(logits.shape[:2])}, got {tuple(y.shape)}")
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, y)


def hits(logits: Tensor, y) -> Optional[tuple[int, int]]:
    """(argmax hits, samples counted): per sample for logits (B, C) / y (B,), per position whose
    target is not -100 for (B, L, C) / (B, L); None when the shapes do not fit together."""
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or logits.shape[:-1] != y.shape:
        return None
    keep = y != IGNORE_INDEX
    return int(((logits.detach().argmax(-1) == y) & keep).sum()), int(keep.sum())


class OnDevice(nn.Module):
    """``net`` run on ``device``: inputs moved there, outputs moved back to the inputs' device.

    Both moves are differentiable copies, so gradients (and input Jacobians) flow back to the
    caller's tensors. ``net`` itself is registered as a submodule (state_dict, train/eval).
    """

    def __init__(self, net: nn.Module, device: Union[str, torch.device]):
        super().__init__()
        self.net, self.device = net, torch.device(device)

    def to_net(self, obj):
        return to_device(obj, self.device)

    def back(self, obj, device):
        return to_device(obj, device)

    def forward(self, *args, **kwargs):
        t = first_tensor((args, kwargs))
        home = t.device if t is not None else self.device
        out = self.net(*self.to_net(args), **self.to_net(kwargs))
        return self.back(out, home)
