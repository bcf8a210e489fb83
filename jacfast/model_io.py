"""How jacfast calls a model as users write it: which input is differentiated, where the logits are.

``ModelCall(model, outputs=None, inputs=None)``:

- ``x`` may be a Tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``).
  ``inputs=`` names the differentiated entry: an int index for a tuple/list, a str key for a
  dict; None means ``x`` itself (a Tensor). The other entries (attention masks, token ids,
  ...) are passed through untouched and never differentiated; they may be integer tensors.
- ``outputs=`` says where the logits are in what the model returns: None (a Tensor), a str
  (``out["logits"]`` for a mapping, else ``out.logits``: dicts and ``ModelOutput``-like
  objects), an int (``out[i]`` of a tuple/list) or a callable (``outputs(out)``).
- Logits are (B, C), or (B, L, C) for sequence outputs.

:meth:`ModelCall.bind` fixes one batch ``x`` and returns a :class:`BoundCall`: a callable
``f(xd) -> logits`` of the differentiated tensor alone, which is what the Jacobian
strategies and estimators differentiate. For a Tensor ``x`` with ``outputs=None`` it is the
model itself (no wrapper on the plain path).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from jacfast.dtypes import FLOAT_DTYPES  # noqa: F401  (the dtypes a differentiated input may have)

def describe(value: Any) -> str:
    """A short description of what a model returned: type, and shapes / keys of its parts."""
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        try:
            parts = ", ".join(f"{k!r}: {_short(value[k])}" for k in list(value.keys())[:8])
        except Exception:  # noqa: BLE001  (a mapping that cannot be read is described by its type)
            parts = "..."
        return f"{type(value).__name__} {{{parts}}}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)} ({', '.join(_short(v) for v in value[:8])})"
    return type(value).__name__

def _fn_key(fn):
    """A function by its code (an inline lambda is a new object at every call, the same code),
    anything else (a str, an int, a module) by itself."""
    return getattr(fn, "__code__", fn)

def _short(v) -> str:
    return f"Tensor{tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__

def _how_to_pick(value) -> str:
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        keys = list(value.keys())
        return f"pick the logits with outputs={keys[0]!r}" if keys else "pick the logits with outputs=<key>"
    if isinstance(value, (tuple, list)):
        return "pick the logits with outputs=0 (the index of the logits)"
    if hasattr(value, "logits"):
        return "pick the logits with outputs='logits'"
    return "pass outputs=<key, attribute name, index or callable> to pick the logits"

class BoundCall:
    """``f(xd) -> logits`` for one batch: ``xd`` replaces the differentiated input of ``x``.

    Attributes: ``module`` (the user's model, to inspect: BatchNorm, dropout, training mode),
    ``xd`` (the differentiated tensor of this batch), ``plain`` (True when ``f`` is the model
    itself: Tensor x, outputs=None, no adapter), ``passthrough`` (True when other inputs ride
    along, which then have the original batch's size and cannot be concatenated/replicated).
    """

    def __init__(self, call: "ModelCall", x, adapter: Optional[Callable] = None):
        self.call, self.module, self.adapter = call, call.model, adapter
        self.xd = call.differentiated(x)
        self._x = x
        self.passthrough = not isinstance(x, Tensor)
        self.plain = not self.passthrough and call.outputs is None and adapter is None
        self.fn = self.module if self.plain else self  # the plain path calls the model directly

    def key(self):
        """What the auto-strategy cache must tell apart besides the model and xd's shape."""
        extra = ()
        if self.passthrough:
            entries = self._x.items() if isinstance(self._x, dict) else enumerate(self._x)
            extra = tuple((k, tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (k, type(v).__name__)
                          for k, v in entries)
        return (_fn_key(self.call.outputs), self.call.inputs, extra, _fn_key(self.adapter))

    def raw(self, xd: Tensor):
        """What the model returns when ``xd`` replaces the differentiated input."""
        if self.adapter is not None:
            xd = self.adapter(xd)
        x = self._x
        if isinstance(x, Tensor):
            return self.module(xd)
        if isinstance(x, dict):
            args = dict(x)
            args[self.call.inputs] = xd
            return self.module(**args)
        args = list(x)
        args[self.call.inputs] = xd
        return self.module(*args)

    def __call__(self, xd: Tensor):
        return self.call.logits(self.raw(xd))

class ModelCall:
    """A model as users write it, seen as ``x -> logits`` (see the module docstring).

    Args:
        model: a callable (an ``nn.Module`` or a function).
        outputs: None | str | int | callable: where the logits are in the model's return value.
        inputs: None | int | str: which entry of a tuple/list (int) or dict (str) ``x`` is
            differentiated; None for a Tensor ``x``.
    """

    def __init__(self, model, *, outputs=None, inputs=None):
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
        if not (outputs is None or callable(outputs) or isinstance(outputs, str)
                or (isinstance(outputs, int) and not isinstance(outputs, bool))):
            raise TypeError(f"outputs must be None, a str key/attribute, an int index or a callable, "
                            f"got {type(outputs).__name__}")
        if not (inputs is None or isinstance(inputs, str) or (isinstance(inputs, int) and not isinstance(inputs, bool))):
            raise TypeError(f"inputs must be None, an int index (tuple x) or a str key (dict x), "
                            f"got {type(inputs).__name__}")
        self.model, self.outputs, self.inputs = model, outputs, inputs
        if isinstance(inputs, str):
            self._check_takes(inputs)

    def _check_takes(self, name: str) -> None:
        """ValueError when the model's signature plainly lacks a keyword ``name``."""
        fn = self.model.forward if isinstance(self.model, nn.Module) else self.model
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return  # no signature to read (a builtin, a compiled wrapper): the call will tell
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if name not in names:
            raise ValueError(f"inputs={name!r}: the model ({type(self.model).__name__}) takes no argument "
                             f"named {name!r}; it takes {names}")

    # -- inputs ------------------------------------------------------------------------------------
    def differentiated(self, x) -> Tensor:
        """The tensor of ``x`` that is differentiated, validated (floating, with a batch dim)."""
        if isinstance(x, Tensor):
            if self.inputs is not None:
                raise ValueError(f"inputs={self.inputs!r} picks an entry of a tuple or dict x, but x is a Tensor "
                                 f"of shape {tuple(x.shape)}; drop inputs= or pass x as a tuple/dict")
            xd, name = x, "x"
        elif isinstance(x, dict):
            if not isinstance(self.inputs, str):
                raise ValueError(f"x is a dict with keys {list(x)}: say which entry is differentiated with "
                                 f"inputs=<key>, e.g. inputs={next(iter(x), 'inputs_embeds')!r}"
                                 + ("" if self.inputs is None else f" (got inputs={self.inputs!r})"))
            if self.inputs not in x:
                raise ValueError(f"inputs={self.inputs!r} is not a key of x; x has keys {list(x)}")
            xd, name = x[self.inputs], f"x[{self.inputs!r}] (inputs={self.inputs!r})"
        elif isinstance(x, (tuple, list)):
            if not any(isinstance(v, Tensor) for v in x):
                raise TypeError(f"x must be a torch.Tensor, or a tuple/list/dict holding the model's tensor inputs; "
                                f"got {describe(x)}")
            if isinstance(self.inputs, str) or self.inputs is None:
                raise ValueError(f"x is a {type(x).__name__} of {len(x)} entries: say which one is differentiated "
                                 f"with inputs=<index>" + ("" if self.inputs is None else f" (got {self.inputs!r})"))
            if not -len(x) <= self.inputs < len(x):
                raise ValueError(f"inputs={self.inputs} is out of range for x, a {type(x).__name__} of {len(x)}")
            xd, name = x[self.inputs], f"x[{self.inputs}] (inputs={self.inputs})"
        else:
            raise TypeError(f"x must be a torch.Tensor, a tuple/list or a dict of model inputs, got {type(x).__name__}")
        if not isinstance(xd, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor to be differentiated, got {type(xd).__name__}")
        if xd.dtype not in FLOAT_DTYPES:
            where = "" if name == "x" else "; choose a floating entry (e.g. inputs_embeds, not input_ids) with inputs="
            raise TypeError(f"{name} must have a floating dtype (float32, float64, float16, bfloat16) to be "
                            f"differentiated, got {xd.dtype}{where}")
        if xd.dim() < 2:
            raise ValueError(f"{name} must have a batch dimension, shape (B, *input_dims), got shape "
                             f"{tuple(xd.shape)}; use x.unsqueeze(0) for a single sample")
        return xd

    def bind(self, x, adapter: Optional[Callable] = None):
        """``f(xd) -> logits`` for the batch ``x`` (the model itself on the plain path)."""
        return BoundCall(self, x, adapter)

    # -- outputs -----------------------------------------------------------------------------------
    def logits(self, out) -> Tensor:
        """The logits in ``out`` (what the model returned), by ``outputs=``."""
        pick = self.outputs
        if pick is None:
            if not isinstance(out, Tensor):
                raise TypeError(f"model must return a logits tensor of shape (B, C) or (B, L, C), got "
                                f"{describe(out)}; {_how_to_pick(out)}")
            return out
        if callable(pick):
            got = pick(out)
            how = f"outputs={getattr(pick, '__name__', 'callable')}"
        elif isinstance(pick, str):
            how = f"outputs={pick!r}"
            if hasattr(out, "keys") and hasattr(out, "__getitem__"):
                if pick not in out.keys():
                    raise ValueError(f"{how}: the model returned {describe(out)}, which has no key {pick!r}; "
                                     f"keys: {list(out.keys())}")
                got = out[pick]
            elif hasattr(out, pick):
                got = getattr(out, pick)
            else:
                raise ValueError(f"{how}: the model returned {describe(out)}, which has no key or attribute {pick!r}")
        else:
            how = f"outputs={pick}"
            if not isinstance(out, (tuple, list)):
                raise TypeError(f"{how} indexes a tuple/list, but the model returned {describe(out)}; "
                                f"{_how_to_pick(out)}")
            if not -len(out) <= pick < len(out):
                raise ValueError(f"{how} is out of range: the model returned {describe(out)}")
            got = out[pick]
        if not isinstance(got, Tensor):
            raise TypeError(f"{how} gave {describe(got)}, not a logits tensor (B, C) or (B, L, C); the model "
                            f"returned {describe(out)}")
        return got

def as_call(model, outputs=None, inputs=None) -> ModelCall:
    """``model`` as a :class:`ModelCall` (one given as such is used as is, if no override)."""
    if isinstance(model, ModelCall):
        if outputs is not None or inputs is not None:
            return ModelCall(model.model, outputs=outputs if outputs is not None else model.outputs,
                             inputs=inputs if inputs is not None else model.inputs)
        return model
    return ModelCall(model, outputs=outputs, inputs=inputs)
