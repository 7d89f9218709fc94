"""Batched photo augmentation on tensors: per-sample random crops (scale, aspect), flips and
brightness/contrast/colour jitter, done for a whole batch at once so 2 CPU cores keep up."""

from __future__ import annotations

import torch
from torchvision.ops import roi_align


def random_boxes(n: int, size: int, generator: torch.Generator, scale=(0.45, 1.0), ratio=(0.8, 1.25)) -> torch.Tensor:
    area = torch.empty(n).uniform_(*scale, generator=generator) * size * size
    aspect = torch.exp(torch.empty(n).uniform_(torch.log(torch.tensor(ratio[0])).item(),
                                               torch.log(torch.tensor(ratio[1])).item(), generator=generator))
    w = torch.sqrt(area * aspect).clamp(max=size)
    h = torch.sqrt(area / aspect).clamp(max=size)
    x0 = torch.rand(n, generator=generator) * (size - w)
    y0 = torch.rand(n, generator=generator) * (size - h)
    return torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + w, y0 + h], dim=1)


def augment(batch: torch.Tensor, out_size: int, generator: torch.Generator) -> torch.Tensor:
    """batch: (n, 3, s, s) float in [0, 1]. Returns (n, 3, out_size, out_size)."""
    n, _, size, _ = batch.shape
    crops = roi_align(batch, random_boxes(n, size, generator), output_size=out_size, aligned=True)
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    brightness = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=generator)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=generator)
    colour = torch.empty(n, 3, 1, 1).uniform_(0.9, 1.1, generator=generator)
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    crops = ((crops - mean) * contrast + mean) * brightness * colour
    return crops.clamp_(0, 1)


def centre(batch: torch.Tensor, out_size: int) -> torch.Tensor:
    """The evaluation view: the whole photo resized (what the workers' decoder produces)."""
    return torch.nn.functional.interpolate(batch, size=(out_size, out_size), mode="bilinear",
                                           antialias=True, align_corners=False)
