"""Models without the offline pipeline: a random-init network with data-calibrated BatchNorm, and a
gallery built from folders of photos. Enough to run the fleet end to end; not a trained model."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import torch

from shared.embedder import Embedder
from shared.errors import DecodeError
from shared.gallery import LandmarkPhotos, build_gallery, calibrate_thresholds, embed_files, image_files
from shared.imaging import decode_image
from shared.model import LandmarkNet, ModelMeta, load_checkpoint, save_checkpoint
from shared.training.dataset import read_landmarks

log = logging.getLogger(__name__)


@torch.no_grad()
def calibrate_batchnorm(net: LandmarkNet, pixels: np.ndarray, mean, std) -> None:
    """Set every BatchNorm's running statistics from real images (cumulative average), so a random
    network's embeddings spread out instead of all pointing the same way."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    batch = (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for chunk in batch.split(32):
        if len(chunk) > 1:
            net(chunk)
    net.eval()


def _pixels(paths: list[Path], size: int) -> np.ndarray:
    out = []
    for path in paths:
        try:
            out.append(decode_image(path.read_bytes(), size=size, max_pixels=200_000_000).pixels)
        except DecodeError:
            continue
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def init_model(out: Path, *, backbone: str, dim: int, size: int, version: str | None,
               calibrate: Path | None, seed: int = 0) -> ModelMeta:
    torch.manual_seed(seed)
    meta = ModelMeta(version=version or f"init_{uuid.uuid4().hex[:8]}", backbone=backbone,
                     embedding_dim=dim, input_size=size)
    net = LandmarkNet(backbone, dim, 0).eval()
    if calibrate is not None:
        calibrate_batchnorm(net, _pixels(image_files(calibrate)[:256], size), meta.mean, meta.std)
    save_checkpoint(out, net, meta)
    return meta


def gallery_from_folders(model: Path, landmarks_dir: Path, csv_path: Path, negatives_dir: Path, out: Path,
                         *, n_references: int = 3) -> ModelMeta:
    """Per landmark folder: the first `n_references` photos are its references, all its photos feed
    its centroids; thresholds keep 99 % of the negatives out. Writes a new model version."""
    net, meta, _ = load_checkpoint(model)
    embedder = Embedder(model, "cpu", precision="fp32")  # the gallery in full precision, as `landmarks build` has it
    items = []
    for info in read_landmarks(csv_path):
        files = image_files(landmarks_dir / info.slug)
        embeddings, _kept = embed_files(embedder, files)
        if len(embeddings) == 0:
            log.warning("landmark %s has no readable photos; left out", info.slug)
            continue
        items.append(LandmarkPhotos(info, embeddings[:n_references], embeddings))
    gallery = build_gallery(items)
    negatives, _ = embed_files(embedder, image_files(negatives_dir))
    thresholds = calibrate_thresholds(gallery, negatives)
    meta.version = f"{meta.version.split('_g')[0]}_g{uuid.uuid4().hex[:6]}"
    meta.t_geo, meta.t_global, meta.t_ref = thresholds["t_geo"], thresholds["t_global"], thresholds["t_ref"]
    save_checkpoint(out, net, meta, gallery)
    return meta
