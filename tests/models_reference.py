"""Float64 references built by hand for tests/test_models_*.py: one autograd.grad per Jacobian row."""
import torch


def reference_rows(fn, x, flat_idx, create_graph=False):
    """Rows (B, K, *x.shape[1:]) of fn(x) (B, L, C) or (B, C) at flat indices position * C + class
    (class for (B, C)), -1 = zero row; one autograd.grad per row (``create_graph``: differentiable
    with respect to fn's parameters)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x).flatten(1)
    rows = []
    for k in range(flat_idx.shape[1]):
        idx = flat_idx[:, k]
        picked = out.gather(1, idx.clamp(min=0)[:, None])[:, 0] * (idx >= 0)
        (g,) = torch.autograd.grad(picked.sum(), x, retain_graph=True, create_graph=create_graph)
        rows.append(g)
    return torch.stack(rows, 1)


def topk_per_position(logits, pos, k):
    """Flat indices (B, P * k) of the k largest logits (ties to the lower index) at positions pos (B, P)."""
    B, P = pos.shape
    at = logits.gather(1, pos[:, :, None].expand(B, P, logits.shape[2]))
    cls = torch.sort(at, dim=2, descending=True, stable=True).indices[:, :, :k]
    return (pos[:, :, None] * logits.shape[2] + cls).reshape(B, P * k)
