"""The model's side of a GPU worker, on a real CUDA device: what the CPU tests cannot show. Marked `gpu` and
skipped without CUDA; bench/device_run.sh runs them (`pytest -m gpu`) on a lent machine before its bench.

bf16 autocast with channels_last keeps the embeddings the CPU's fp32 model gives; pixels decoded on the
device embed as pixels from the pool do; batch threads on their own streams (device_decode.thread_stream)
each get their own batch's embeddings; batches padded to the served sizes, and the compiled model
(LANDMARKS_TORCH_COMPILE), give the eager one's."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.device_decode import stack_pixels, thread_stream
from shared.embedder import Embedder
from shared.imaging import decode_image
from shared.modelinit import init_model
from shared.synthetic import write_photo_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SIZE = 96


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    """48 generated photos."""
    root = tmp_path_factory.mktemp("photos")
    write_photo_set(root, n_landmarks=4, photos_per_landmark=4, n_everyday=32, seed=7)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, photo_root):
    """BatchNorm calibrated on the photos: uncalibrated, every input gets nearly the same embedding, and the
    checks below could not tell one photo's embedding from another's."""
    path = tmp_path_factory.mktemp("model") / "m.pt"
    init_model(path, backbone="resnet_small", dim=64, size=SIZE, version="cuda_v1", calibrate=photo_root)
    return path


@pytest.fixture(scope="module")
def pick_photos(photo_root) -> Callable[..., np.ndarray]:
    photos = np.stack([decode_image(path.read_bytes(), size=SIZE, max_pixels=1 << 24).pixels
                       for path in sorted(photo_root.rglob("*.jpg"))])

    def pick(n: int, seed: int = 0) -> np.ndarray:
        """n different photos at the model's size, in an order of their own."""
        return photos[np.random.default_rng(seed).choice(len(photos), n, replace=False)]
    return pick


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)  # the embedder's outputs are L2-normalised


def test_bf16_channels_last_on_cuda_gives_the_cpu_fp32_embeddings(checkpoint, pick_photos):
    pixels = pick_photos(16)
    on_cpu = Embedder(checkpoint, "cpu", precision="fp32").embed(pixels)
    on_cuda = Embedder(checkpoint, "cuda").embed(pixels)
    assert on_cuda.dtype == np.float32 and on_cuda.shape == (16, 64)
    assert _cosines(on_cpu, on_cuda).min() > 0.995
    between_photos = on_cpu @ on_cpu.T - 2 * np.eye(16)
    assert between_photos.max() < 0.95  # so the checks in this module can tell a photo from another


def test_pixels_decoded_on_the_device_embed_as_the_pools_pixels_do(checkpoint, pick_photos):
    """The pipeline stacks the device decoder's (3, size, size) float tensors with the pool's uint8 arrays
    (stack_pixels) and embeds them in one batch; a batch the pool decoded alone goes over the same way."""
    embedder = Embedder(checkpoint, "cuda")
    pixels = pick_photos(6, seed=1)
    from_host = embedder.embed(pixels)
    on_device = [torch.from_numpy(p).cuda().permute(2, 0, 1).float() for p in pixels[::2]]
    mixed = stack_pixels([on_device[0], pixels[1], on_device[1], pixels[3], on_device[2], pixels[5]], "cuda")
    assert mixed.device.type == "cuda" and mixed.shape == (6, 3, SIZE, SIZE)
    assert _cosines(from_host, embedder.embed(mixed)).min() > 0.9999
    all_from_pool = stack_pixels(list(pixels), "cuda")  # one pinned buffer, one asynchronous copy
    assert all_from_pool.device.type == "cuda" and all_from_pool.shape == (6, 3, SIZE, SIZE)
    assert _cosines(from_host, embedder.embed(all_from_pool)).min() > 0.9999


def test_batch_threads_on_their_own_streams_each_get_their_own_embeddings(checkpoint, pick_photos):
    embedder = Embedder(checkpoint, "cuda")
    batches = [pick_photos(32, seed=s) for s in (2, 3)]
    expected = [embedder.embed(b) for b in batches]
    got: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def run(which: int) -> None:
        with thread_stream(embedder.device):
            for _ in range(5):
                got[which].append(embedder.embed(batches[which]))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for which in (0, 1):
        assert len(got[which]) == 5
        for embeddings in got[which]:
            assert _cosines(expected[which], embeddings).min() > 0.9999


def test_batches_padded_to_the_served_sizes_give_the_unpadded_embeddings(checkpoint, pick_photos, caplog):
    as_they_come = Embedder(checkpoint, "cuda")
    served = Embedder(checkpoint, "cuda", batch_size=8)  # runs at 1, 2, 4 and 8
    with caplog.at_level(logging.INFO, logger="shared.embedder"):
        served.warm_up()  # as each batch thread does at worker start
    assert any("timed cuDNN's algorithms for batches of 8" in r.getMessage() for r in caplog.records)
    pixels = pick_photos(11, seed=5)
    for n in (3, 8, 11):  # padded to 4, as it is, split into 8 + 3 (padded to 4)
        assert _cosines(as_they_come.embed(pixels[:n]), served.embed(pixels[:n])).min() > 0.999


@pytest.mark.slow
def test_the_compiled_model_on_cuda_gives_the_eager_embeddings(checkpoint, pick_photos):
    eager = Embedder(checkpoint, "cuda")
    compiled = Embedder(checkpoint, "cuda", batch_size=8, compile_model=True)
    pixels = pick_photos(11, seed=4)
    for n in (3, 8, 11):  # padded, as compiled, split
        assert _cosines(eager.embed(pixels[:n]), compiled.embed(pixels[:n])).min() > 0.999
