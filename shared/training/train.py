"""Training: softmax + center loss over n landmarks + 1 non-landmark class, with separate learning
rates for backbone, embedding and classifier (the article), one epoch at a time."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.model import LandmarkNet
from shared.training.augment import augment, centre
from shared.training.losses import CenterLoss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    backbone: str = "resnet_small"
    embedding_dim: int = 128
    input_size: int = 96            # the model's input; training crops are resized to it
    batch_size: int = 64
    epochs_per_stage: tuple[int, ...] = (4, 3, 3, 4)
    lr_backbone: float = 2e-3
    lr_embedding: float = 3e-3
    lr_classifier: float = 3e-3
    lr_centers: float = 0.1
    center_weight: float = 0.01     # 0.05 collapsed the prototype's embedding (QUALITY-NOTES.md)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0


@dataclass
class EpochStats:
    loss: float
    cross_entropy: float
    center: float
    accuracy: float
    images_per_s: float


def make_optimizer(net: LandmarkNet, center_loss: CenterLoss, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": net.trunk.parameters(), "lr": cfg.lr_backbone, "name": "backbone"},
        {"params": net.embedding.parameters(), "lr": cfg.lr_embedding, "name": "embedding"},
        {"params": net.classifier.parameters(), "lr": cfg.lr_classifier, "name": "classifier"},
        {"params": center_loss.parameters(), "lr": cfg.lr_centers, "weight_decay": 0.0, "name": "centers"},
    ], weight_decay=cfg.weight_decay)


def normalise(batch: torch.Tensor, mean, std) -> torch.Tensor:
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


def set_lr_scale(optimizer: torch.optim.Optimizer, base: dict[str, float], scale: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base[group["name"]] * scale


def train_one_epoch(net: LandmarkNet, center_loss: CenterLoss, optimizer: torch.optim.Optimizer,
                    images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, generator: torch.Generator,
                    mean, std, lr_schedule: Callable[[float], float] | None = None,
                    on_step: Callable[[int], None] | None = None) -> EpochStats:
    """images: (n, s, s, 3) uint8; labels: landmark index, n_landmarks = non-landmark."""
    net.train()
    order = torch.randperm(len(images), generator=generator).numpy()
    base = {g["name"]: g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    totals, seen, correct, started = np.zeros(3), 0, 0, time.perf_counter()
    steps = math.ceil(len(order) / cfg.batch_size)
    for step in range(steps):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        if len(idx) < 2:
            continue
        if lr_schedule:
            set_lr_scale(optimizer, base, lr_schedule(step / steps))
        batch = normalise(augment(to_float(images[idx]), cfg.input_size, generator), mean, std)
        batch = batch.contiguous(memory_format=torch.channels_last)  # ~15 % faster convolutions on CPU
        target = torch.from_numpy(labels[idx]).long()
        embedding, logits = net(batch)
        ce = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
        centre_term = center_loss(embedding, target)
        loss = ce + cfg.center_weight * centre_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += np.array([loss.item(), ce.item(), centre_term.item()]) * len(idx)
        seen += len(idx)
        correct += int((logits.argmax(1) == target).sum())
        if on_step:
            on_step(len(idx))
    elapsed = time.perf_counter() - started
    loss, ce, centre_term = totals / max(1, seen)
    return EpochStats(loss, ce, centre_term, correct / max(1, seen), seen / max(elapsed, 1e-9))


@torch.inference_mode()
def embed_images(net: LandmarkNet, images: np.ndarray, input_size: int, mean, std,
                 batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings of whole photos (the view the workers see)."""
    net.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_float(images[start:start + batch_size])
        if batch.shape[-1] != input_size:
            batch = centre(batch, input_size)
        chunks.append(net.embed(normalise(batch, mean, std)).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, net.embedding[0].out_features), np.float32)


def cosine_schedule(warmup: float = 0.05) -> Callable[[float], float]:
    def scale(progress: float) -> float:
        if progress < warmup:
            return (progress + 1e-3) / warmup
        return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))) * 0.95 + 0.05
    return scale
