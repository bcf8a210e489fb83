"""The trainers' evaluation: accuracy on tensors (clean and under input noise), Datasets and DataLoaders
(a mixin of :class:`~jacfast.trainers.Trainer`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from jacfast.trainers.batches import hits, model_logits, to_device
from jacfast.trainers.grad_scaling import unwrap


class Evaluation:
    """Evaluation methods; the trainer provides ``model``, ``device``, ``autocast``, ``batch_fn``,
    ``outputs``, ``eval_data``, ``eval_sigmas``, ``num_workers`` and ``collate_fn``."""

    def _evaluate_eval_data(self) -> dict:
        d = self.eval_data
        if isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(t, Tensor) for t in d):
            return self.evaluate(*d, sigmas=(0.0, *self.eval_sigmas))
        if self.eval_sigmas:
            raise TypeError("eval_sigmas (input noise) needs eval_data as (x, y) tensors")
        return self.evaluate(d)

    @torch.no_grad()
    def evaluate(self, x, y: Optional[Tensor] = None, sigmas: Sequence[float] = (0.0,), batch_size: int = 1000,
                 seed: int = 1234) -> dict[float, float]:
        """Accuracy on (x (N, ...), y (N,)) clean (sigma 0) and under Gaussian input noise N(0, sigma^2);
        or, with ``y=None``, on a Dataset / DataLoader ``x`` (clean only; batches go through
        ``batch_fn``; sequence targets (N, L) count per position, -100 ignored).

        The noise comes from its own generator (``seed``), so every model sees the same noise and
        training RNG state is untouched. Inputs are not clipped after adding noise.
        """
        if y is None and isinstance(x, Tensor):
            raise TypeError("evaluate: y (N,) is required when x is a Tensor")
        if y is None and any(float(s) != 0.0 for s in sigmas):
            raise TypeError("evaluate: sigmas (input noise) needs x and y as tensors")
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        try:
            if y is None:
                return {0.0: self._accuracy_on(model, x, batch_size)}
            if tuple(float(s) for s in sigmas) != (0.0,) and not isinstance(x, Tensor):
                raise TypeError("sigmas (input noise) needs x as a Tensor")
            out = {}
            for sigma in sigmas:
                g = torch.Generator().manual_seed(seed)
                hits_n = total = 0
                for i in range(0, x.shape[0], batch_size):
                    xb = x[i:i + batch_size]
                    if sigma > 0:
                        xb = xb + sigma * torch.randn(xb.shape, generator=g, dtype=xb.dtype)
                    h, n = self._hits(model, xb, y[i:i + batch_size])
                    hits_n, total = hits_n + h, total + n
                out[float(sigma)] = hits_n / max(total, 1)
            return out
        finally:
            model.train(was_training)

    def _hits(self, model, inputs, y: Tensor) -> tuple[int, int]:
        """(correct, counted) for one batch: samples, or non-ignored positions of sequences."""
        with self.autocast():
            logits = model_logits(model, to_device(inputs, self.device), self.outputs)
        h = hits(logits, y.to(logits.device))
        if h is None:
            raise ValueError(f"evaluate: logits {tuple(logits.shape)} do not fit targets {tuple(y.shape)} "
                             f"({y.dtype})")
        return h

    def _accuracy_on(self, model, data, batch_size: int) -> float:
        from torch.utils.data import DataLoader

        loader = data if isinstance(data, DataLoader) else DataLoader(
            data, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
            **({"collate_fn": self.collate_fn} if self.collate_fn is not None else {}))
        hits_n = total = 0
        for batch in loader:
            x, y = self.batch_fn(batch)
            h, n = self._hits(model, x, y)
            hits_n, total = hits_n + h, total + n
        return hits_n / max(total, 1)
