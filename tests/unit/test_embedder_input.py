"""The worker's model sees a photo as training saw it: the published centroids were computed from embeddings
made with training's normalisation (shared/training/train.embed_images), and a worker that normalised its
pixels any other way would search them with embeddings from another place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.embedder import Embedder
from shared.imaging import decode_image
from shared.model import load_checkpoint
from shared.modelinit import init_model
from shared.synthetic import write_photo_set
from shared.training.train import embed_images, normalise, to_float

SIZE = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> np.ndarray:
    landmarks, _, everyday = write_photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=3,
                                             photos_per_landmark=4, n_everyday=6)
    files = sorted(landmarks.rglob("*.jpg")) + sorted(everyday.glob("*.jpg"))
    return np.stack([decode_image(f.read_bytes(), size=SIZE, max_pixels=10**8).pixels for f in files])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.pt"
    init_model(path, backbone="tiny", dim=32, size=SIZE, version="input_v1", calibrate=None)
    return path


def test_the_worker_embeds_a_photo_as_training_did(model, photos):
    served = Embedder(model, device="cpu", precision="fp32").embed(photos)
    net, meta, _ = load_checkpoint(model)
    trained = embed_images(net, photos, SIZE, meta.mean, meta.std)
    np.testing.assert_allclose(served, trained, atol=1e-5)


def test_a_batch_from_the_device_decoder_embeds_as_the_same_photos_from_the_host(model, photos):
    embedder = Embedder(model, device="cpu", precision="fp32")
    channels_first = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()  # as shared/device_decode hands them
    np.testing.assert_allclose(embedder.embed(channels_first), embedder.embed(photos), atol=1e-5)


def test_photos_of_another_size_than_the_served_one_are_normalised_for_their_own(model, photos):
    embedder = Embedder(model, device="cpu", precision="fp32")
    embedder.embed(photos)  # the served size's constants made first
    larger = np.repeat(np.repeat(photos, 2, axis=1), 2, axis=2)
    net, meta, _ = load_checkpoint(model)
    with torch.inference_mode():  # training's normalisation, without embed_images' resize to the served size
        expected = net.embed(normalise(to_float(larger), meta.mean, meta.std)).numpy()
    np.testing.assert_allclose(embedder.embed(larger), expected, atol=1e-5)
