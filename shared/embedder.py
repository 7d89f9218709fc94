"""Batched inference: uint8 pixel batches in, L2-normalised float32 embeddings out."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from shared.model import LandmarkNet, ModelMeta, load_checkpoint

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Embedder:
    """Loads its checkpoint on first use, so CUDA is initialised in the worker process only."""

    def __init__(self, checkpoint: Path, device: str = "auto") -> None:
        self.checkpoint = Path(checkpoint)
        self.requested_device = device
        self._net: LandmarkNet | None = None
        self._meta: ModelMeta | None = None
        self.gallery: dict = {}  # the checkpoint's centroids and references (the worker's search replica)
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._net is not None:
                return
            self.device = pick_device(self.requested_device)
            net, meta, self.gallery = load_checkpoint(self.checkpoint)
            net = net.to(self.device).eval()
            if self.device.type == "cuda":
                net = net.to(memory_format=torch.channels_last)
            mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255
            std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255
            self._mean, self._std = mean, std
            self._net, self._meta = net, meta
            log.info("loaded model %s (%s, dim %d) on %s", meta.version, meta.backbone,
                     meta.embedding_dim, self.device)

    @property
    def meta(self) -> ModelMeta:
        self.load()
        assert self._meta is not None
        return self._meta

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """pixels: (n, size, size, 3) uint8 RGB."""
        self.load()
        if len(pixels) == 0:
            return np.zeros((0, self.meta.embedding_dim), dtype=np.float32)
        batch = torch.from_numpy(np.ascontiguousarray(pixels))
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float()
        batch = ((batch - self._mean) / self._std)
        if on_gpu:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on_gpu):
            embeddings = self._net.embed(batch)
        return embeddings.float().cpu().numpy()
