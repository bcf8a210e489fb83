"""Shared test helper: an autograd parameter gradient against central differences of the loss."""
import torch


def assert_matches_directional_differences(loss_value, params, grad, *, directions=3, h=1e-5, tol=1e-6):
    """For random directions d: (L(p + h d) - L(p - h d)) / 2h must equal <grad, d>.

    ``loss_value()`` returns the loss as a float at the current parameters; ``grad`` is the
    flattened parameter gradient. The tolerance is relative to max(|<grad, d>|, ||grad||).
    """
    for _ in range(directions):
        v = [torch.randn_like(p) for p in params]
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.add_(sign * h * d)
            vals.append(loss_value())
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.sub_(sign * h * d)
        fd = (vals[0] - vals[1]) / (2 * h)
        ad = float(grad @ torch.cat([d.reshape(-1) for d in v]))
        assert abs(fd - ad) <= tol * max(abs(ad), grad.norm().item()), (fd, ad)
