"""The bench's settings and its progress reporting."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class Reporter(Protocol):
    def start(self, what: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class NullReporter:
    def start(self, what: str, total: int | None = None) -> None:
        log.info("bench: %s", what)

    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class BenchConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N
    size: str = "2mp"  # 12mp | 2mp | real
    images: int | None = None
    quick: bool = False
    backbone: str | None = None
    input_size: int | None = None
    embedding_dim: int | None = None
    batch_size: int | None = None
    centroids: int | None = None
    compile: bool = False
    max_wait_ms: int | None = None  # the worker's LANDMARKS_MAX_WAIT_MS; None keeps the served setting
    delf: bool = True  # the DELF comparison costs ~30 s on 2 CPU cores; long RSS runs may skip it
    load_only: bool = False  # only the worker end to end: a long backlog's throughput and memory over time
    workers: int = 1  # worker processes end to end
    home: Path = Path(".landmarks")
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def resolved(self) -> BenchConfig:
        """Defaults by device: the served model of each machine, and enough images that filling and draining
        the worker's pipeline (a batch or two) weigh little against the steady state (32-128 batches)."""
        cuda = self.cuda
        batch = self.batch_size or _env_int("LANDMARKS_BATCH_SIZE") or (256 if cuda else 64)
        if self.quick:
            images, batch = self.images or 16, self.batch_size or 8
        else:  # `real` defaults to two passes over the photos found
            images = self.images or {("12mp", False): 2048, ("2mp", False): 8192, ("12mp", True): 2048,
                                     ("2mp", True): 4096}.get((self.size, cuda))
        return replace(self, images=images, batch_size=batch,
                       backbone=self.backbone or ("wide_resnet50_2" if cuda else "resnet_small"),
                       input_size=self.input_size or (224 if cuda else 96),
                       embedding_dim=self.embedding_dim or (512 if cuda else 128),
                       centroids=self.centroids or (300 if self.quick else 10_000))

    @property
    def precision(self) -> str:
        """The forward's number format as the worker serves it (LANDMARKS_PRECISION, shared/embedder.py)."""
        import torch

        from shared.embedder import uses_bf16
        from shared.settings import get_settings
        return "bf16" if uses_bf16(get_settings().precision, torch.device(self.device)) else "fp32"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None
