"""Input-gradient passes in a scaled domain (the fp16 underflow guard of the trainers)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale`` (differentiably)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None  # a plain product: differentiable again (double backward)


class GradScaled(nn.Module):
    """Wraps a network so input gradients are computed in a scaled domain (fp16 underflow guard).

    ``forward(*args, **kwargs)`` returns ``net(...)`` unchanged; a backward seed at an output is multiplied by
    ``scale`` before it runs through the (fp16) network and divided by it again, in the input's
    dtype (fp32), when it reaches ``x``. The input gradient is therefore the true one, in fp32.
    Parameter gradients are unaffected: the ``scale`` and ``1/scale`` factors cancel on the path
    from the output, and parameters do not sit on the input side.
    """

    def __init__(self, net: nn.Module, scale: float = 1.0):
        super().__init__()
        self.net, self.scale = net, float(scale)

    def forward(self, *args, **kwargs):
        if self.scale == 1.0:
            return self.net(*args, **kwargs)
        from jacfast.trainers.batches import map_tensors

        # Inputs that take a gradient (the differentiated one, wherever it sits in a tuple or
        # dict of inputs) and every floating output are scaled; masks and ids pass untouched.
        down = (lambda t: _ScaleGrad.apply(t, 1.0 / self.scale)
                if t.requires_grad and t.is_floating_point() else t)
        up = lambda t: _ScaleGrad.apply(t, self.scale) if t.is_floating_point() else t
        return map_tensors(self.net(*map_tensors(args, down), **map_tensors(kwargs, down)), up)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network under DDP / GradScaled wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, GradScaled)):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model.net
    return model
