"""Batched inference: uint8 pixel batches in, L2-normalised float32 embeddings out."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shared.model import LandmarkNet, ModelMeta, load_checkpoint
from shared.settings import get_settings

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). oneDNN then runs a bf16 forward in
    about 40 % less CPU time than fp32 (BENCHMARKS.md, twenty-seventh session); without them it emulates bf16,
    which is slower than fp32. torch's own checks, which are private: a torch without them reads as no."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """The forward's number format: ``auto`` is bf16 on CUDA and on a CPU that computes bf16 itself."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())
    return precision == "bf16"


def batch_shapes(batch_size: int) -> tuple[int, ...]:
    """The batch sizes a CUDA model runs at when it serves batches of up to ``batch_size``: the powers of two
    to 32, every 32nd size above, and ``batch_size``. A batch that closes on the clock has any size below
    the full one, and cuDNN times its algorithms anew for each size it meets (seconds, with the GPU idle):
    a worker meets at most these. A padded batch costs GPU time only when the GPU has time to spare (under
    load, batches are full)."""
    sizes = {min(1 << k, batch_size) for k in range(6)} | set(range(64, batch_size, 32)) | {batch_size}
    return tuple(sorted(sizes))


Forward = Callable[[torch.Tensor], torch.Tensor]


def photo_constants(mean: torch.Tensor, std: torch.Tensor, height: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (height, width, 3) and contiguous, such that ``pixel * scale + shift`` is
    ``(pixel - mean) / std`` for an (n, height, width, 3) batch of host pixels; ``mean`` and ``std`` in 0..255
    units, shaped (1, 3, 1, 1), on the device the batch is normalised on."""
    scale = (1 / std).view(1, 1, 3).expand(height, width, 3).contiguous()
    shift = (-mean / std).view(1, 1, 3).expand(height, width, 3).contiguous()
    return scale, shift


def normalised_photos(pixels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(n, h, w, 3) pixels (0..255) as the model's (n, 3, h, w) float input, in channels_last memory.
    One multiply-add over memory as it lies, the constants as large as a photo: per-channel constants broadcast
    over the permuted batch cost 3 to 6 times the CPU (`bench/normalise.py`: 4.0 against 0.6 ms for 64 photos of
    96 px, 354 against 118 for 256 of 224, on one thread)."""
    return pixels.to(torch.float32, copy=True).mul_(scale).add_(shift).permute(0, 3, 1, 2)


def padded(forward: Forward, shapes: tuple[int, ...], layout: torch.memory_format) -> Forward:
    """``forward`` run at ``shapes`` only: a batch is padded with zeros to the next size of ``shapes`` (each
    image's embedding is its own: the model is in eval mode), one larger than the last is split."""
    largest = shapes[-1]

    def run(batch: torch.Tensor) -> torch.Tensor:
        n = len(batch)
        if n > largest:
            return torch.cat([run(part) for part in batch.split(largest)])
        shape = shapes[bisect.bisect_left(shapes, n)]
        if n < shape:
            batch = torch.cat([batch, batch.new_zeros((shape - n, *batch.shape[1:]))])
        return forward(batch.contiguous(memory_format=layout))[:n]
    return run


class Embedder:
    """Loads its checkpoint on first use, so CUDA is initialised in the worker process only."""

    def __init__(self, checkpoint: Path, device: str = "auto", batch_size: int = 0,
                 compile_model: bool = False, precision: str | None = None) -> None:
        """``batch_size``: the largest batch served, when known. On CUDA, the model then runs at the few
        sizes of ``batch_shapes``. ``compile_model``: the forward is compiled (torch.compile) for batches of
        ``batch_size`` while loading, so that the compilation is done before the first batch arrives.
        ``precision``: one of PRECISIONS (uses_bf16); unset, LANDMARKS_PRECISION's, as the workers serve."""
        if compile_model and not batch_size:
            raise ValueError("compiling the model needs the batch size it serves")
        self.checkpoint = Path(checkpoint)
        self.requested_device = device
        self.batch_size = batch_size
        self.compile_model = compile_model
        self.precision = precision or get_settings().precision
        uses_bf16(self.precision, torch.device("cpu"))  # an unknown name fails here, not at the first batch
        self.bf16 = False  # known once loaded
        self._layout = torch.contiguous_format
        self._net: LandmarkNet | None = None
        self._meta: ModelMeta | None = None
        self.gallery: dict = {}  # the checkpoint's centroids and references (the worker's search replica)
        self._forward_cpu_ms: float | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._net is not None:
                return
            self.device = pick_device(self.requested_device)
            net, meta, self.gallery = load_checkpoint(self.checkpoint)
            net = net.to(self.device).eval()
            self.bf16 = uses_bf16(self.precision, self.device)
            if self.device.type == "cuda" or self.bf16:  # oneDNN's and cuDNN's bf16 kernels take NHWC
                self._layout = torch.channels_last
                net = net.to(memory_format=torch.channels_last)
            if self.device.type == "cuda":
                # cuDNN times its convolution algorithms for each input shape the first time it meets it and
                # keeps the fastest (the anchors' 9,500 img/s were measured so): once per size of batch_shapes
                # and thread (warm_up).
                torch.backends.cudnn.benchmark = True
            mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255
            std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255
            self._mean, self._std = mean, std
            # Made here for the served size, so that on CUDA the synchronize below orders them before any batch.
            self._photo_constants = photo_constants(mean, std, meta.input_size, meta.input_size)
            self._forward = self._served(net)
            if self.compile_model:  # torch.compile compiles on the first call: done here, before any batch
                seconds = self._run_blank_batch(self.batch_size, meta.input_size)
                log.info("compiled the model for batches of %d in %.1f s", self.batch_size, seconds)
            if self.device.type == "cuda":
                # The layout change and the constants above are kernels queued on this thread's stream; a
                # batch thread's own stream, which reads them next, is not ordered after it.
                torch.cuda.synchronize(self.device)
            self._net, self._meta = net, meta
            log.info("loaded model %s (%s, dim %d) on %s, %s%s", meta.version, meta.backbone, meta.embedding_dim,
                     self.device, "bf16" if self.bf16 else "fp32", ", compiled" if self.compile_model else "")

    def _constants_for(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self._photo_constants
        if scale.shape[:2] == (height, width):
            return scale, shift
        return photo_constants(self._mean, self._std, height, width)  # another size: made on this thread's stream

    def _served(self, net: LandmarkNet) -> Forward:
        """The forward as batches meet it: net.embed as it is on the CPU (oneDNN times nothing per size); on
        CUDA, at the sizes of batch_shapes; compiled, at the one size compiled (a padded batch costs less than
        a recompile per size)."""
        # One layout for every call (embed's): another would be compiled again.
        if self.compile_model:
            return padded(torch.compile(net.embed, dynamic=False), (self.batch_size,), self._layout)
        if self.device.type == "cuda" and self.batch_size:
            return padded(net.embed, batch_shapes(self.batch_size), self._layout)
        return net.embed

    def _run_blank_batch(self, photos: int, input_size: int) -> float:
        """Seconds to run the forward once on a blank batch of ``photos``, on the calling thread."""
        start = time.perf_counter()
        blank = torch.zeros(photos, 3, input_size, input_size, device=self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            self._forward(blank)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - start

    def forward_cpu_ms(self, photos: int = 4) -> float:
        """CPU milliseconds per photo of the forward on this machine at the served precision, on the CPU:
        a blank batch of ``photos`` run twice on the calling thread (the first run builds oneDNN's kernels),
        the second timed, times the thread's torch threads. Measured once."""
        self.load()
        with self._lock:
            if self._forward_cpu_ms is None:
                size = self._meta.input_size
                self._run_blank_batch(photos, size)
                seconds = self._run_blank_batch(photos, size)
                self._forward_cpu_ms = seconds * 1000 * torch.get_num_threads() / photos
                log.info("the forward costs %.1f ms of CPU per photo on %s", self._forward_cpu_ms, self.device)
            return self._forward_cpu_ms

    def warm_up(self) -> None:
        """On CUDA, the forward once at the served batch size, on the calling thread, before batches come:
        cuDNN times its algorithms the first time it meets a shape, and keeps what it found per thread
        (torch's cuDNN benchmark cache is thread-local). So each batch thread calls this (workers/pool.py);
        the smaller sizes are timed when first met, when the GPU has time to spare."""
        self.load()
        if self.device.type != "cuda" or not self.batch_size:
            return
        seconds = self._run_blank_batch(self.batch_size, self.meta.input_size)
        log.info("timed cuDNN's algorithms for batches of %d on thread %s in %.1f s", self.batch_size,
                 threading.current_thread().name, seconds)

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
        if isinstance(pixels, torch.Tensor):
            batch = (pixels.to(self.device).float() - self._mean) / self._std
        else:
            batch = torch.from_numpy(np.ascontiguousarray(pixels))
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            batch = normalised_photos(batch, *self._constants_for(batch.shape[1], batch.shape[2]))
        if self._layout == torch.channels_last:
            # Host pixels come NHWC (already channels_last once permuted); a device decoder's come NCHW.
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embeddings = self._forward(batch)
        return embeddings.float().cpu().numpy()
