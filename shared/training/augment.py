"""Batched photo augmentation on tensors: per-sample rotation, zoom, shift and flip in one affine
resampling, then brightness/contrast/colour jitter, for a whole batch at once so 2 CPU cores keep up."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)


def random_affine(n: int, generator: torch.Generator, *, max_degrees: float = 15.0,
                  zoom: tuple[float, float] = (0.55, 1.0), shift: float = 0.25) -> torch.Tensor:
    """(n, 2, 3) sampling grids' matrices: the crop covers `zoom` of the photo, rotated and shifted."""
    angle = _uniform(n, -max_degrees, max_degrees, generator) * math.pi / 180
    scale = _uniform(n, *zoom, generator)
    aspect = torch.exp(_uniform(n, -0.15, 0.15, generator))
    sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
    room_x, room_y = (1 - sx).clamp(min=0), (1 - sy).clamp(min=0)
    tx = _uniform(n, -1, 1, generator) * torch.minimum(room_x + shift * sx, torch.ones(n))
    ty = _uniform(n, -1, 1, generator) * torch.minimum(room_y + shift * sy, torch.ones(n))
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                        torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)


def augment(batch: torch.Tensor, out_size: int, generator: torch.Generator) -> torch.Tensor:
    """batch: (n, 3, s, s) float in [0, 1]. Returns (n, 3, out_size, out_size)."""
    n = batch.shape[0]
    grid = F.affine_grid(random_affine(n, generator), [n, 3, out_size, out_size], align_corners=False)
    crops = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = _uniform(n, 0.7, 1.3, generator).view(n, 1, 1, 1)
    contrast = _uniform(n, 0.7, 1.3, generator).view(n, 1, 1, 1)
    colour = torch.empty(n, 3, 1, 1).uniform_(0.9, 1.1, generator=generator)
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    crops = ((crops - mean) * contrast + mean) * brightness * colour
    return crops.clamp_(0, 1)


def centre(batch: torch.Tensor, out_size: int) -> torch.Tensor:
    """The evaluation view: the whole photo resized (what the workers' decoder produces)."""
    return F.interpolate(batch, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
