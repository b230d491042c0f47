"""Min-max normalisation to [-1, 1], kept as module buffers so it travels with the weights."""

import numpy as np
import torch
from torch import nn

# A dimension whose range is below this is constant in the data: it is centred, not scaled.
RANGE_EPS = 1e-4


class MinMaxNormalizer(nn.Module):
    """y = 2 (x - low) / (high - low) - 1 per feature (last axis); inverse in `unnormalize`."""

    def __init__(self, low, high):
        super().__init__()
        low = torch.as_tensor(low, dtype=torch.float32)
        high = torch.as_tensor(high, dtype=torch.float32)
        if low.shape != high.shape or low.ndim != 1:
            raise ValueError(f"low and high must be 1-D of one shape, got {tuple(low.shape)} / {tuple(high.shape)}")
        if not torch.all(high >= low):
            raise ValueError("high must be >= low in every dimension")
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    @classmethod
    def fit(cls, data):
        """Fit on (N, D) data (numpy or torch)."""
        data = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if data.ndim != 2 or len(data) == 0:
            raise ValueError(f"fit needs a non-empty (N, D) array, got shape {tuple(data.shape)}")
        if not torch.all(torch.isfinite(data)):
            raise ValueError("cannot fit a normaliser on data with NaN or inf")
        return cls(data.min(0).values, data.max(0).values)

    def _scale_offset(self):
        span = self.high - self.low
        constant = span < RANGE_EPS
        scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(RANGE_EPS))
        centre = torch.where(constant, (self.high + self.low) / 2, self.low)
        offset = torch.where(constant, torch.zeros_like(span), -torch.ones_like(span))
        return scale, centre, offset

    def normalize(self, x):
        """(..., D) raw -> (..., D) in [-1, 1] on the fitted range."""
        scale, centre, offset = self._scale_offset()
        return (x - centre.to(x)) * scale.to(x) + offset.to(x)

    def unnormalize(self, y):
        """Inverse of `normalize`."""
        scale, centre, offset = self._scale_offset()
        return (y - offset.to(y)) / scale.to(y) + centre.to(y)
