"""Triton launches on the current CUDA device, whatever device its tensors are on: the public
functions of the Triton modules make their tensors' device the current one first (as the CUDA
backend's ops do with a device guard), so tensors on cuda:1 work while cuda:0 is current."""
import functools

import torch


def on_tensors_device(fn):
    """``fn`` run with the device of its first tensor argument as the current CUDA device."""

    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return on_device
