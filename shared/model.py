"""The recognition network (backbone → FC+BatchNorm embedding → classifier over n landmarks + 1
non-landmark class) and its self-describing checkpoint file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

CHECKPOINT_FORMAT = "landmarks-model/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelMeta:
    version: str
    backbone: str = "wide_resnet50_2"
    embedding_dim: int = 512
    n_landmarks: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Decision thresholds (DESIGN.md "Decision rule"), calibrated per version.
    t_geo: float = 0.5
    t_global: float = 0.8
    t_ref: float = 0.7
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from shared.index import sanitize_version
        sanitize_version(self.version)  # versions name Milvus collections: fail early, not at publish


class TinyBackbone(nn.Sequential):
    """A few-hundred-k-parameter residual-free CNN for tests and CPU-only smoke runs."""

    out_channels = 128

    def __init__(self) -> None:
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        super().__init__(*block(3, 32), *block(32, 64), *block(64, 96), *block(96, 128))


class SmallResNet(nn.Sequential):
    """A 4-stage ResNet of ~1.2M parameters (torchvision BasicBlocks) for training on 2 CPU cores."""

    out_channels = 256

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        from torchvision.models.resnet import BasicBlock

        def stage(cin: int, cout: int, stride: int) -> nn.Module:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            return BasicBlock(cin, cout, stride, downsample=down)

        # Stem as in ResNet (stride 2 + max-pool): the stages run at 1/4 of the input, which is what
        # makes 2 CPU cores train it at a few hundred photos a second.
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = widths[0]
        for i, width in enumerate(widths):
            layers.append(stage(cin, width, 1 if i == 0 else 2))
            cin = width
        super().__init__(*layers)


def build_trunk(name: str) -> tuple[nn.Module, int]:
    """A backbone without its pooling and classifier, and its number of output channels."""
    if name == "tiny":
        return TinyBackbone(), TinyBackbone.out_channels
    if name == "resnet_small":
        return SmallResNet(), SmallResNet.out_channels
    builders = {"wide_resnet50_2": models.wide_resnet50_2, "resnet50": models.resnet50,
                "resnet18": models.resnet18, "resnet34": models.resnet34}
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; choose one of {['tiny', 'resnet_small', *builders]}")
    net = builders[name](weights=None)
    channels = net.fc.in_features
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                          net.layer1, net.layer2, net.layer3, net.layer4)
    return trunk, channels


class LandmarkNet(nn.Module):
    def __init__(self, backbone: str, embedding_dim: int, n_landmarks: int) -> None:
        super().__init__()
        self.trunk, channels = build_trunk(backbone)
        self.embedding = nn.Sequential(nn.Linear(channels, embedding_dim),
                                       nn.BatchNorm1d(embedding_dim))
        # The last class is "non-landmark"; center loss never applies to it.
        self.classifier = nn.Linear(embedding_dim, n_landmarks + 1)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.feature_map(images).mean(dim=(2, 3))
        embedding = self.embedding(pooled)
        return embedding, self.classifier(embedding)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        embedding, _ = self(images)
        return F.normalize(embedding.float(), dim=1)


def save_checkpoint(path: Path, net: LandmarkNet, meta: ModelMeta, gallery: dict | None = None) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "meta": asdict(meta),
               "state_dict": net.state_dict(), "gallery": gallery or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written model behind


class CheckpointError(ValueError):
    """A file that is not a readable landmarks model checkpoint: empty, truncated, random bytes, a Git LFS
    pointer, another program's pickle, or one written by a builder whose metadata this code does not know."""


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[LandmarkNet, ModelMeta, dict]:
    """The network, its metadata and its gallery. CheckpointError for a file that is not one; OSError for a
    file that cannot be opened."""
    try:
        # weights_only: a model file is data, never code to execute.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError…: what bad bytes raise
        raise CheckpointError(f"{path} is not a readable landmarks model checkpoint ({_load_failure(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a landmarks model checkpoint ({CHECKPOINT_FORMAT})")
    try:
        meta = _meta(payload["meta"])
        net = LandmarkNet(meta.backbone, meta.embedding_dim, meta.n_landmarks)
        net.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a missing key, an unknown field, other shapes
        raise CheckpointError(f"{path} is not a readable landmarks model checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    return net.eval(), meta, payload.get("gallery") or {}


def _load_failure(exc: Exception) -> str:
    """``UnpicklingError: Unsupported operand 255``: why torch.load refused a file, in one line. Never torch's
    advice to load it again with weights_only=False: that would run whatever code the file holds."""
    text = str(exc)
    _, weights_only, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if weights_only else text).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].split('. ')[0]}" if lines else type(exc).__name__


def _meta(stored: dict) -> ModelMeta:
    raw = dict(stored)
    raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
    return ModelMeta(**raw)
