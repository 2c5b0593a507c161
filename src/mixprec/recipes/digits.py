"""scikit-learn's bundled handwritten digits (real 8x8 scans, 1,797 images), as tensors.

Shared by the vision, detection and gan recipes. The split is fixed: image ``i`` goes to
validation when ``i % 5 == 0`` (360 images) and to training otherwise (1,437), so every
machine with the same scikit-learn sees the same sets. Pixels are scaled from 0..16 to
[0, 1]. Nothing is downloaded: the data ships inside scikit-learn.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["load_digits_split", "upsample"]

VAL_EVERY = 5


@functools.lru_cache(maxsize=1)
def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, val_x, val_y)``: images ``float32 (N, 1, 8, 8)`` in [0, 1] and
    labels ``int64 (N,)``. Cached per process and shared: treat them as read-only."""
    from sklearn.datasets import load_digits  # imported here: only the digit recipes need it

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    val = torch.arange(len(y)) % VAL_EVERY == 0
    return x[~val].contiguous(), y[~val].contiguous(), x[val].contiguous(), y[val].contiguous()


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, 1, H, W)`` images to ``size x size`` (values stay in [0, 1])."""
    if images.shape[-1] == size:
        return images
    out = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0)
