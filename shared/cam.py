"""Class activation maps for LandmarkNet: where in the photo the evidence for a landmark is.

LandmarkNet is trunk → global average pool → embedding (Linear + BatchNorm1d) → classifier (Linear).
In eval mode BatchNorm1d is an affine map, so everything after the pool is affine and a class score is
linear in the pooled features:

    score_k = W_eff[k] · mean_{y,x} fmap[:, y, x] + b_eff[k]
    W_eff   = W_cls @ diag(bn.weight / sqrt(bn.running_var + eps)) @ W_fc

Each position's share of the score is W_eff[k] · fmap[:, y, x] (Zhou et al., "Learning Deep Features
for Discriminative Localization", 2016, with the affine head folded in). The map is that share,
ReLU'd, normalised to [0, 1] and upsampled to the image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.model import LandmarkNet


def effective_head(net: LandmarkNet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eval-mode head folded into matrices on the pooled features.

    Returns (W_emb (D, C), b_emb (D,), W_cls_eff (K, C), b_cls_eff (K,)) such that
    embedding = W_emb @ pooled + b_emb and logits = W_cls_eff @ pooled + b_cls_eff.
    """
    fc, bn = net.embedding[0], net.embedding[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_emb = scale[:, None] * fc.weight
    b_emb = scale * (fc.bias - bn.running_mean) + bn.bias
    w_cls = net.classifier.weight @ w_emb
    b_cls = net.classifier.weight @ b_emb + net.classifier.bias
    return w_emb, b_emb, w_cls, b_cls


def _input(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (h, w, 3) RGB pixels, got shape {pixels.shape}")
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    x = (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(std, dtype=torch.float32)[:, None, None]
    return x.unsqueeze(0)


@torch.no_grad()
def class_activation_map(
    net: LandmarkNet,
    pixels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    class_index: int | None = None,
) -> np.ndarray:
    """(h, w) float32 map in [0, 1] over `pixels` ((h, w, 3) uint8 RGB, the model's input).

    class_index None: the top-scoring landmark class (never the last, "non-landmark", class). A
    classifier with only the non-landmark class (a gallery model: recognition is by embedding
    distance, not by the classifier) gets the per-position norm of the embedding contribution,
    ||W_emb @ fmap[:, y, x]||, instead: where the embedding comes from.
    """
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters())
        x = _input(pixels, mean, std).to(device=param.device, dtype=param.dtype)
        fmap = net.feature_map(x)[0]  # (C, h, w)
        w_emb, _, w_cls, b_cls = effective_head(net)
        n_classes = w_cls.shape[0]
        if class_index is not None and not 0 <= class_index < n_classes:
            raise ValueError(f"class_index {class_index} out of range for {n_classes} classes")
        if class_index is None and n_classes == 1:
            raw = torch.einsum("dc,chw->dhw", w_emb, fmap).norm(dim=0)
        else:
            if class_index is None:
                logits = w_cls @ fmap.mean(dim=(1, 2)) + b_cls
                class_index = int(torch.argmax(logits[:-1]))
            raw = torch.einsum("c,chw->hw", w_cls[class_index], fmap).clamp_min(0)
        raw = raw.float().cpu()
    finally:
        net.train(was_training)
    peak = float(raw.max())
    cam = raw / peak if peak > 0 and np.isfinite(peak) else torch.zeros_like(raw)
    h, w = pixels.shape[:2]
    up = F.interpolate(cam[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return up.clamp_(0.0, 1.0).numpy().astype(np.float32)


def jet(values: np.ndarray) -> np.ndarray:
    """Jet-like colormap: [0, 1] → (…, 3) uint8, dark blue → cyan → yellow → dark red."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def overlay(
    image_rgb: np.ndarray,
    cam: np.ndarray,
    *,
    alpha: float = 0.5,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """`cam` coloured and blended over `image_rgb` ((H, W, 3) uint8) at `alpha`.

    box (left, top, right, bottom): the region of the image the map covers (the model's centre crop);
    outside it the photo is dimmed, since the model never saw it. The map is resized to its region.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected (h, w, 3) RGB image, got shape {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    left, top, right, bottom = box if box is not None else (0, 0, width, height)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"box {box} outside the {width}x{height} image")
    region = (right - left, bottom - top)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != (region[1], region[0]):
        cam = np.asarray(Image.fromarray(cam).resize(region, Image.Resampling.BILINEAR))
    base = image_rgb.astype(np.float32)
    out = base * 0.45  # dimmed outside the covered region
    inside = base[top:bottom, left:right]
    out[top:bottom, left:right] = (1.0 - alpha) * inside + alpha * jet(cam).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def overlay_png(
    image_rgb: np.ndarray,
    cam: np.ndarray,
    *,
    alpha: float = 0.5,
    box: tuple[int, int, int, int] | None = None,
) -> bytes:
    """The blended heatmap (see `overlay`) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(overlay(image_rgb, cam, alpha=alpha, box=box), "RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
