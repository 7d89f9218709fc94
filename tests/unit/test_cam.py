"""Class activation maps: the folded head is exact, and the map lights up where a planted pattern drives the class."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shared.cam import class_activation_map, effective_head, jet, overlay, overlay_png
from shared.model import LandmarkNet

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
SIZE = 128
SQUARE = (slice(64, 96), slice(32, 64))  # rows, cols of the planted red square


def _red_detector(n_landmarks: int) -> LandmarkNet:
    """A tiny net whose weights make a red patch, and only a red patch, drive class 1 (and the embedding)."""
    net = LandmarkNet("tiny", 32, n_landmarks)
    with torch.no_grad():
        for module in net.trunk:
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                # Channel 0 passes straight through each stride-2 layer (centre tap only).
                module.weight[0, 0, 1, 1] = 1.0
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
                module.reset_running_stats()
        first = net.trunk[0]
        first.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])  # R - G - B: only red survives the ReLU
        fc, bn = net.embedding
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0, 0] = 1.0
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.1)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(3.0)
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        if n_landmarks >= 2:
            net.classifier.weight[1, 0] = 1.0   # class 1 = "red landmark"
            net.classifier.weight[0, 0] = -1.0  # class 0 is hurt by red
            net.classifier.bias[0] = -2.0
            net.classifier.bias[-1] = 5.0       # background wins the logits: it must still be skipped
    return net.eval()


def _planted(colour=(255, 0, 0)) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 120, size=(SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0] = np.minimum(pixels[..., 0], pixels[..., 1])  # background never reads as red
    pixels[SQUARE] = colour
    return pixels


def _inside_outside(cam: np.ndarray) -> tuple[float, float]:
    mask = np.zeros(cam.shape, dtype=bool)
    mask[SQUARE] = True
    return float(cam[mask].mean()), float(cam[~mask].mean())


def test_folded_head_reproduces_the_network_exactly():
    torch.manual_seed(0)
    net = LandmarkNet("tiny", 16, 4)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        bn = net.embedding[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding, logits = net(x)
        pooled = net.feature_map(x).mean(dim=(2, 3))
        w_emb, b_emb, w_cls, b_cls = effective_head(net)
        torch.testing.assert_close(pooled @ w_emb.T + b_emb, embedding, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled @ w_cls.T + b_cls, logits, atol=1e-4, rtol=1e-4)


def test_cam_lights_up_the_planted_pattern_for_the_top_landmark_class():
    net = _red_detector(n_landmarks=2)
    cam = class_activation_map(net, _planted(), MEAN, STD)
    assert cam.shape == (SIZE, SIZE) and cam.dtype == np.float32
    assert 0.0 <= cam.min() and cam.max() == pytest.approx(1.0)
    inside, outside = _inside_outside(cam)
    assert inside > 0.5 and outside < 0.05, (inside, outside)
    peak = np.unravel_index(np.argmax(cam), cam.shape)
    assert SQUARE[0].start <= peak[0] < SQUARE[0].stop and SQUARE[1].start <= peak[1] < SQUARE[1].stop
    # The net is left in eval mode (or whatever mode it was in).
    assert not net.training


def test_cam_of_a_class_the_pattern_argues_against_is_empty():
    net = _red_detector(n_landmarks=2)
    cam = class_activation_map(net, _planted(), MEAN, STD, class_index=0)
    assert cam.max() == 0.0  # only negative evidence: ReLU leaves nothing
    with pytest.raises(ValueError, match="out of range"):
        class_activation_map(net, _planted(), MEAN, STD, class_index=3)


def test_gallery_model_uses_the_embedding_contribution():
    net = _red_detector(n_landmarks=0)  # one class: non-landmark only
    cam = class_activation_map(net, _planted(), MEAN, STD)
    inside, outside = _inside_outside(cam)
    assert inside > 0.5 and outside < 0.05, (inside, outside)


def test_no_pattern_gives_an_all_zero_map():
    net = _red_detector(n_landmarks=2)
    cam = class_activation_map(net, _planted(colour=(0, 200, 0)), MEAN, STD)
    assert cam.max() == 0.0


def test_jet_and_overlay_png():
    ends = jet(np.array([0.0, 0.5, 1.0]))
    assert ends[0].tolist() == [0, 0, 128] and ends[2].tolist() == [128, 0, 0]
    assert ends[1][1] == 255  # green in the middle
    image = np.full((60, 100, 3), 200, dtype=np.uint8)
    cam = np.zeros((20, 20), dtype=np.float32)
    cam[5:10, 5:10] = 1.0
    blended = overlay(image, cam, box=(20, 0, 80, 60))
    assert blended.shape == image.shape
    assert (blended[:, :20] < 100).all()  # outside the box: dimmed
    png = overlay_png(image, cam, box=(20, 0, 80, 60))
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (100, 60)
    with pytest.raises(ValueError):
        overlay(image, cam, box=(0, 0, 200, 60))
