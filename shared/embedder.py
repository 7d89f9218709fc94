"""Batched inference: uint8 pixel batches in, L2-normalised float32 embeddings out."""

from __future__ import annotations

import logging
import threading
import time
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

    def __init__(self, checkpoint: Path, device: str = "auto", compile_batch: int = 0) -> None:
        """``compile_batch``: when not 0, the forward is compiled (torch.compile) for batches of that size
        while loading, so that the compilation is done before the first batch arrives."""
        self.checkpoint = Path(checkpoint)
        self.requested_device = device
        self.compile_batch = compile_batch
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
                # cuDNN times its convolution algorithms for each input shape the first time it meets it and
                # keeps the fastest (the anchors' 9,500 img/s were measured so). A worker's batches are nearly
                # all full under load, so it times them once; each smaller size costs one timing too.
                torch.backends.cudnn.benchmark = True
            mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255
            std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255
            self._mean, self._std = mean, std
            self._forward = net.embed
            if self.compile_batch:
                self._forward = self._compiled(net, meta.input_size, self.compile_batch)
            if self.device.type == "cuda":
                # The layout change and the constants above are kernels queued on this thread's stream; a
                # batch thread's own stream, which reads them next, is not ordered after it.
                torch.cuda.synchronize(self.device)
            self._net, self._meta = net, meta
            log.info("loaded model %s (%s, dim %d) on %s%s", meta.version, meta.backbone,
                     meta.embedding_dim, self.device, ", compiled" if self.compile_batch else "")

    def _compiled(self, net: LandmarkNet, input_size: int, batch_size: int):
        """net.embed compiled for one batch shape: a smaller batch is padded to it (its padding costs less
        than a recompile per size), a larger one split. Compiled and warmed up here, at load."""
        compiled = torch.compile(net.embed, dynamic=False)
        # One layout for every call (embed uses channels_last on CUDA): another would be compiled again.
        layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

        def forward(batch: torch.Tensor) -> torch.Tensor:
            n = len(batch)
            if n > batch_size:
                return torch.cat([forward(part) for part in batch.split(batch_size)])
            if n < batch_size:
                batch = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
            return compiled(batch.contiguous(memory_format=layout))[:n]

        start = time.perf_counter()
        warm_up = torch.zeros(batch_size, 3, input_size, input_size, device=self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            forward(warm_up)
        log.info("compiled the model for batches of %d in %.1f s", batch_size, time.perf_counter() - start)
        return forward

    @property
    def meta(self) -> ModelMeta:
        self.load()
        assert self._meta is not None
        return self._meta

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """pixels: (n, size, size, 3) uint8 RGB on the host, or (n, 3, size, size) 0..255 on the device (from
        shared/device_decode.py)."""
        self.load()
        if len(pixels) == 0:
            return np.zeros((0, self.meta.embedding_dim), dtype=np.float32)
        on_gpu = self.device.type == "cuda"
        if isinstance(pixels, torch.Tensor):
            batch = pixels.to(self.device).float()
        else:
            batch = torch.from_numpy(np.ascontiguousarray(pixels))
            if on_gpu:
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            batch = batch.permute(0, 3, 1, 2).float()
        batch = ((batch - self._mean) / self._std)
        if on_gpu:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on_gpu):
            embeddings = self._forward(batch)
        return embeddings.float().cpu().numpy()
