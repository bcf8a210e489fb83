"""Backend registry: which kernel implementation serves a call (public: ``jacfast.backends()``).

Backends, in the order ``"auto"`` prefers them:

- ``"cuda"``   the CUDA extension ``jacfast._C_cuda`` (CUDA tensors; built by setup.py when nvcc exists)
- ``"triton"`` Triton kernels in ``jacfast/kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, the Triton interpreter, which is how the test suite checks them)
- ``"cpu"``    the C++ extension ``jacfast._C`` (CPU tensors)
- ``"torch"``  plain PyTorch autograd (``jacfast/reference.py``): always available

``"auto"`` picks cuda > triton > torch for CUDA tensors and cpu > torch for CPU tensors and
falls back silently. A backend the caller names explicitly is never replaced: if it cannot
serve the call, :class:`BackendUnavailableError` says why.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no GPU, no triton...)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not available ("" when available); devices served when available

    def __str__(self) -> str:
        return f"{self.name:7s} {'yes' if self.available else 'no ':3s}  {self.reason}"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import(name: str) -> tuple[ModuleType | None, str]:
    """Import an optional module once; return (module, "") or (None, reason)."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a CUDA build failing for lack of a driver
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


@functools.lru_cache(maxsize=None)
def _interpreter_error() -> str:
    """Whether the Triton interpreter runs one probe kernel ("" when it does): once per process."""
    return importlib.import_module("jacfast.kernels.interpreter_probe").interpreter_error()


def _versions(*modules: str) -> str:
    return ", ".join(f"{m} {getattr(_import(m)[0], '__version__', '?')}" for m in modules)


def status_for(name: str, device_type: str | None) -> BackendStatus:
    """Status of backend ``name`` for tensors on ``device_type`` (None: anywhere)."""
    if name == "torch":
        return BackendStatus(name, True, "plain PyTorch autograd, any device")
    if name == "cpu":
        if device_type not in (None, "cpu"):
            return BackendStatus(name, False, f"serves CPU tensors only, got {device_type}")
        _, why = _import("jacfast._C")
        if why:
            return BackendStatus(name, False, f"C++ extension jacfast._C not built ({why}); run `pip install -e .`")
        return BackendStatus(name, True, "C++ extension, CPU tensors")
    if name == "cuda":
        if device_type not in (None, "cuda"):
            return BackendStatus(name, False, f"serves CUDA tensors only, got {device_type}")
        _, why = _import("jacfast._C_cuda")
        if why:
            return BackendStatus(name, False, f"CUDA extension jacfast._C_cuda not built or not loadable ({why})")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA GPU visible to torch")
        return BackendStatus(name, True, "CUDA extension, CUDA tensors")
    if name == "triton":
        _, why = _import("triton")
        if why:
            return BackendStatus(name, False, f"triton is not installed ({why})")
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if _triton_interpreting():
                why = _interpreter_error()
                if why:
                    return BackendStatus(name, False, f"the Triton interpreter cannot run here ({why}); "
                                         f"{_versions('triton', 'numpy')}")
                return BackendStatus(name, True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors")
            return BackendStatus(name, False, "no CUDA GPU; set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors")
        if device_type == "cuda" and not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA GPU visible to torch")
        return BackendStatus(name, True, "Triton kernels, CUDA tensors")
    raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """For each backend name: whether it is available on this machine, and why not."""
    return {name: status_for(name, None) for name in BACKENDS}


def resolve(backend: str, device: torch.device) -> str:
    """Name of the backend that serves tensors on ``device`` for the request ``backend``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if status_for(name, device.type).available:
                return name
        return "torch"
    status = status_for(backend, device.type)
    if not status.available:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {status.reason}")
    return backend


@torch.compiler.assume_constant_result
def resolve_in_graph(backend: str, device_type: str) -> str:
    """:func:`resolve` by device type, for code that torch.compile traces: the result is
    constant per (backend, device type), so graphs hold the name instead of the lookup."""
    return resolve(backend, torch.device(device_type))


def kernels(backend: str, op: str):
    """The kernel namespace of ``backend`` for ``op`` ("jacobian_matching" or "topk_seeds").

    Native backends expose ``torch.ops.jacfast_<backend>.<fn>``; Triton exposes Python
    functions of the same names in ``jacfast.kernels.triton_<op>``.
    """
    if backend == "cpu":
        _import("jacfast._C")
        return torch.ops.jacfast_cpu
    if backend == "cuda":
        _import("jacfast._C_cuda")
        return torch.ops.jacfast_cuda
    if backend == "triton":
        return importlib.import_module(f"jacfast.kernels.triton_{op}")
    raise ValueError(f"backend {backend!r} has no kernels")
