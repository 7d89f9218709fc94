"""Center loss (Wen et al. 2016) for the landmark classes only: a landmark is one object with a
centre, the non-landmark class is anything and has none (the article)."""

from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    def __init__(self, n_landmarks: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(n_landmarks, dim) * 0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """labels in [0, n_landmarks]; label n_landmarks (non-landmark) contributes nothing."""
        mask = labels < self.centers.shape[0]
        if not mask.any():
            return embeddings.new_zeros(())
        diff = embeddings[mask] - self.centers[labels[mask]]
        return 0.5 * diff.pow(2).sum(dim=1).mean()
